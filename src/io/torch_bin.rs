//! PyTorch state-dict files (`pytorch_model.bin`, the shards of `pytorch_model.bin.index.json`)
//! read without Python, so a checkpoint saved by `save_pretrained(safe_serialization=False)` or a
//! plain `torch.save(model.state_dict(), ...)` loads like a safetensors one.
//!
//! Such a file is a zip archive (entries stored, not compressed): `<name>/data.pkl`, a pickle of
//! the dict whose tensors point by persistent id at `<name>/data/<key>`, one entry per storage,
//! plus `<name>/byteorder` ("little") and bookkeeping records. A pickle is a program that may
//! import and call anything, so [`entries`] runs a restricted unpickler: it knows exactly the
//! opcodes and the handful of globals `torch.save(state_dict)` writes (protocol 2, and the framing
//! of protocols 3-5), and refuses anything else naming the file, the opcode or global, and its
//! byte offset. Nothing is imported or called; a tensor is only a dtype, a shape and a byte range
//! of the memory-mapped file, which `MappedTensors` decodes as it does safetensors data.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use zip::{CompressionMethod, ZipArchive};

use super::tensors::TensorEntry;

/// The single-file weights name transformers writes with `safe_serialization=False`.
pub const TORCH_SINGLE_FILE: &str = "pytorch_model.bin";
/// Its shard index name.
pub const TORCH_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// Whether `path` names a PyTorch pickle file (by extension, as transformers decides).
pub(super) fn is_torch_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth")
    )
}

/// Every tensor of the state dict in the torch zip archive `bytes` (the whole file at `path`),
/// with its dtype, shape and absolute byte range in `bytes`. Names may share bytes (tied weights).
pub(super) fn entries(path: &Path, bytes: &[u8]) -> Result<Vec<(String, TensorEntry)>> {
    if !bytes.starts_with(b"PK\x03\x04") {
        if bytes.first() == Some(&0x80) {
            bail!(
                "{} is a PyTorch file in the legacy format (torch.save before PyTorch 1.6, or \
                 _use_new_zipfile_serialization=False), which is not supported; re-save it with \
                 torch.save's default format or as safetensors",
                path.display()
            );
        }
        bail!(
            "{} is not a PyTorch zip archive (it does not start with a zip header)",
            path.display()
        );
    }
    let archive = Archive::open(path, bytes)?;
    let value = Unpickler::new(&bytes[archive.data_pkl.clone()])
        .run()
        .with_context(|| {
            format!(
                "unpickling {}/data.pkl in {}",
                archive.prefix,
                path.display()
            )
        })?;
    let Value::Dict(items) = &value else {
        bail!(
            "{}: data.pkl holds a {}, not a state dict (a dict of tensors)",
            path.display(),
            value.kind()
        );
    };
    let items = items.borrow();
    let mut out = Vec::with_capacity(items.len());
    for (key, value) in items.iter() {
        let Value::Str(name) = key else {
            bail!(
                "{}: state dict key is a {}, not a string",
                path.display(),
                key.kind()
            );
        };
        let Value::Tensor(t) = value else {
            bail!(
                "{}: state dict entry {name} is a {}, not a tensor",
                path.display(),
                value.kind()
            );
        };
        let entry = archive
            .tensor_entry(t)
            .with_context(|| format!("tensor {name} in {}", path.display()))?;
        out.push((name.to_string(), entry));
    }
    Ok(out)
}

/// The records of a torch zip archive that matter: the pickle and the storages, as byte ranges
/// of the file (stored entries are the file's own bytes).
struct Archive {
    prefix: String,
    data_pkl: std::ops::Range<usize>,
    /// storage key -> byte range of `<prefix>/data/<key>`
    storages: HashMap<String, std::ops::Range<usize>>,
}

impl Archive {
    fn open(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut zip = ZipArchive::new(Cursor::new(bytes))
            .with_context(|| format!("{} is not a valid zip archive", path.display()))?;
        let names = zip
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<Result<Vec<String>, _>>()
            .with_context(|| format!("reading the record names of {}", path.display()))?;
        // torch names every record `<archive name>/<record>`; the archive name is whatever the
        // writer chose (the file stem, or "archive"), so it is found through data.pkl.
        let pkl_names: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let prefix = match pkl_names.as_slice() {
            [one] => one.trim_end_matches("/data.pkl").to_string(),
            [] => bail!(
                "{} is a zip archive without a <name>/data.pkl record: not a torch.save file",
                path.display()
            ),
            many => bail!(
                "{} holds {} data.pkl records ({}); expected one",
                path.display(),
                many.len(),
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut stored = |name: &str| -> Result<std::ops::Range<usize>> {
            let index = zip
                .index_for_name(name)
                .with_context(|| format!("{} has no record {name}", path.display()))?;
            let file = zip
                .by_index_raw(index)
                .with_context(|| format!("reading record {name} of {}", path.display()))?;
            if file.compression() != CompressionMethod::Stored {
                bail!(
                    "record {name} of {} is compressed ({:?}); torch.save stores records \
                     uncompressed, and only such archives are read",
                    path.display(),
                    file.compression()
                );
            }
            let start = file
                .data_start()
                .with_context(|| format!("record {name} of {}: no data offset", path.display()))?;
            let start = usize::try_from(start)?;
            let end = start
                .checked_add(usize::try_from(file.size())?)
                .filter(|&e| e <= bytes.len())
                .with_context(|| {
                    format!(
                        "record {name} of {} runs past the end of the file (truncated?)",
                        path.display()
                    )
                })?;
            Ok(start..end)
        };

        let data_pkl = stored(&format!("{prefix}/data.pkl"))?;
        let byteorder = format!("{prefix}/byteorder");
        if names.contains(&byteorder) {
            let r = stored(&byteorder)?;
            let order = &bytes[r];
            if order != b"little" {
                bail!(
                    "{}: byteorder is {:?}; only little-endian archives are read",
                    path.display(),
                    String::from_utf8_lossy(order)
                );
            }
        }
        let data_dir = format!("{prefix}/data/");
        let mut storages = HashMap::new();
        for name in &names {
            if let Some(key) = name.strip_prefix(&data_dir) {
                storages.insert(key.to_string(), stored(name)?);
            }
        }
        Ok(Archive {
            prefix,
            data_pkl,
            storages,
        })
    }

    /// The byte range of tensor `t`, which must be contiguous and row-major within its storage.
    fn tensor_entry(&self, t: &TensorRef) -> Result<TensorEntry> {
        let s = &t.storage;
        let range = self.storages.get(&s.key).with_context(|| {
            format!(
                "its storage {} is not in the archive (no record {}/data/{})",
                s.key, self.prefix, s.key
            )
        })?;
        // Every storage dtype Global::find accepts is a whole number of bytes.
        let size = s.dtype.bitsize() / 8;
        let storage_bytes = s.numel.checked_mul(size);
        if storage_bytes != Some(range.len()) {
            bail!(
                "storage {} holds {} bytes; the pickle says {} elements of {:?} ({size} bytes each)",
                s.key,
                range.len(),
                s.numel,
                s.dtype
            );
        }
        if t.shape.len() != t.stride.len() {
            bail!(
                "size {:?} and stride {:?} differ in length",
                t.shape,
                t.stride
            );
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .with_context(|| format!("size {:?} overflows", t.shape))?;
        // Row-major contiguity; a dimension of extent 1 may carry any stride (torch gives
        // such dimensions arbitrary strides after some views), and an empty tensor is trivially
        // contiguous.
        let mut expected = 1usize;
        for (&d, &st) in t.shape.iter().zip(&t.stride).rev() {
            if numel > 0 && d != 1 && st != expected {
                bail!(
                    "it is a non-contiguous view (size {:?}, stride {:?}); only row-major \
                     contiguous tensors are read: save it with .contiguous() or as safetensors",
                    t.shape,
                    t.stride
                );
            }
            expected = expected.saturating_mul(d);
        }
        let end_elem = t.offset.checked_add(numel).filter(|&e| e <= s.numel);
        if numel > 0 && end_elem.is_none() {
            bail!(
                "it spans elements {}..{} of storage {}, which has {}",
                t.offset,
                t.offset.saturating_add(numel),
                s.key,
                s.numel
            );
        }
        let start = if numel == 0 {
            range.start
        } else {
            range.start + t.offset * size
        };
        Ok(TensorEntry {
            dtype: s.dtype,
            shape: t.shape.clone(),
            start,
            end: start + numel * size,
        })
    }
}

/// A storage as the pickle names it: `('storage', torch.<T>Storage, key, location, numel)`.
#[derive(Debug)]
struct StorageRef {
    dtype: Dtype,
    key: String,
    numel: usize,
}

/// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The globals a state-dict pickle may name; every other one is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Dtype),
}

impl Global {
    const ALLOWED: &str = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, \
                           torch._utils._rebuild_parameter, torch.<Type>Storage";

    fn find(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            // Integer and double storages are accepted here so that the error names the tensor
            // and its dtype (MappedTensors reads floating-point tensors only).
            ("torch", storage) => Global::Storage(match storage {
                "FloatStorage" => Dtype::F32,
                "HalfStorage" => Dtype::F16,
                "BFloat16Storage" => Dtype::BF16,
                "DoubleStorage" => Dtype::F64,
                "LongStorage" => Dtype::I64,
                "IntStorage" => Dtype::I32,
                "ShortStorage" => Dtype::I16,
                "CharStorage" => Dtype::I8,
                "ByteStorage" => Dtype::U8,
                "BoolStorage" => Dtype::BOOL,
                _ => return None,
            }),
            _ => return None,
        })
    }
}

type Dict = Rc<RefCell<Vec<(Value, Value)>>>;

/// A pickled value. Containers are shared (`Rc`) as Python objects are, so the memo and the
/// stack see one object, and a pickle that references one tuple many times stays linear in size.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A float's value is never needed (one may only sit in `_metadata`).
    Float,
    Str(Rc<str>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Dict),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    /// Equality of dict keys (SETITEM replaces an equal key, as Python does); keys in a state
    /// dict are strings, other kinds compare by value where that is cheap and never match else.
    fn same_key(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::None, Value::None) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            _ => false,
        }
    }
}

/// Dropping iteratively: a crafted pickle can nest a million tuples in a megabyte, and the
/// derived, recursive drop would overflow the stack (an abort, not an error).
impl Drop for Value {
    fn drop(&mut self) {
        fn take_children(v: &mut Value, work: &mut Vec<Value>) {
            match v {
                Value::Tuple(t) => {
                    if let Some(items) = Rc::get_mut(t) {
                        work.append(items);
                    }
                }
                Value::List(l) => {
                    if let Some(items) = Rc::get_mut(l) {
                        work.append(items.get_mut());
                    }
                }
                Value::Dict(d) => {
                    if let Some(items) = Rc::get_mut(d) {
                        for (k, v) in items.get_mut().drain(..) {
                            work.push(k);
                            work.push(v);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut work = Vec::new();
        take_children(self, &mut work);
        while let Some(mut v) = work.pop() {
            take_children(&mut v, &mut work);
        }
    }
}

fn set_item(dict: &Dict, key: Value, value: Value) {
    let mut d = dict.borrow_mut();
    match d.iter_mut().find(|(k, _)| k.same_key(&key)) {
        Some(slot) => slot.1 = value,
        None => d.push((key, value)),
    }
}

/// The pickle opcodes this reader knows by name (all of protocols 0-5), for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "an unknown opcode",
    }
}

/// The restricted unpickler: a stack machine over `data` that builds [`Value`]s and never runs
/// anything.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    /// Run to STOP and return the pickled object.
    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = *self
                .data
                .get(at)
                .with_context(|| format!("the pickle ends at byte {at} without STOP"))?;
            self.pos += 1;
            let done = self.step(op).with_context(|| {
                let shown = if op.is_ascii_graphic() {
                    format!("'{}', ", op as char)
                } else {
                    String::new()
                };
                format!(
                    "opcode {} ({shown}0x{op:02x}) at byte {at}",
                    opcode_name(op)
                )
            })?;
            if let Some(v) = done {
                return Ok(v);
            }
        }
    }

    /// Execute one opcode; `Some` at STOP.
    fn step(&mut self, op: u8) -> Result<Option<Value>> {
        match op {
            0x80 => {
                let proto = self.take(1)?[0];
                if proto > 5 {
                    bail!("pickle protocol {proto} is newer than any Python writes (max 5)");
                }
            }
            // Framing (protocol 4+) only groups opcodes; the frame length is not needed.
            0x95 => {
                self.take(8)?;
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.marks.push(self.stack.len()),
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'K' => {
                let v = self.take(1)?[0];
                self.stack.push(Value::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(v.into()));
            }
            b'J' => {
                let v = i32::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(v.into()));
            }
            0x8a => {
                let n = self.take(1)?[0] as usize;
                let b = self.take(n)?;
                if n > 8 {
                    bail!("a {n}-byte integer does not fit in 64 bits");
                }
                // Little-endian two's complement, sign-extended from its top byte.
                let fill = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut w = [fill; 8];
                w[..n].copy_from_slice(b);
                self.stack.push(Value::Int(i64::from_le_bytes(w)));
            }
            b'G' => {
                self.take(8)?;
                self.stack.push(Value::Float);
            }
            b'X' => {
                let n = u32::from_le_bytes(self.array()?) as usize;
                self.push_str(n)?;
            }
            0x8c => {
                let n = self.take(1)?[0] as usize;
                self.push_str(n)?;
            }
            0x8d => {
                let n = usize::try_from(u64::from_le_bytes(self.array()?))?;
                self.push_str(n)?;
            }
            b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n + self.floor() {
                    bail!("needs {n} items on the stack");
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Value::Tuple(Rc::new(items)));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Value::Tuple(Rc::new(items)));
            }
            b'}' => self.stack.push(Value::Dict(Rc::default())),
            b']' => self.stack.push(Value::List(Rc::default())),
            b'a' => {
                let v = self.pop()?;
                self.top_list()?.borrow_mut().push(v);
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.top_list()?.borrow_mut().extend(items);
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                set_item(&self.top_dict()?, k, v);
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    bail!("an odd number of items ({}) after MARK", items.len());
                }
                let dict = self.top_dict()?;
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    set_item(&dict, k, v);
                }
            }
            b'q' => {
                let i = self.take(1)?[0].into();
                self.put(i)?;
            }
            b'r' => {
                let i = u32::from_le_bytes(self.array()?);
                self.put(i)?;
            }
            0x94 => {
                let i = u32::try_from(self.memo.len())?;
                self.put(i)?;
            }
            b'h' => {
                let i = self.take(1)?[0].into();
                self.get(i)?;
            }
            b'j' => {
                let i = u32::from_le_bytes(self.array()?);
                self.get(i)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push_global(&module, &name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                    bail!(
                        "module and name are a {} and a {}, not strings",
                        module.kind(),
                        name.kind()
                    );
                };
                self.push_global(module, name)?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let storage = persistent_storage(&pid)?;
                self.stack.push(Value::Storage(Rc::new(storage)));
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = reduce(&func, &args)?;
                self.stack.push(v);
            }
            b'b' => {
                // OrderedDict's instance state: the `_metadata` of a state dict (module
                // versions), which says nothing about the tensors.
                let state = self.pop()?;
                let target = self.top().context("BUILD on an empty stack")?;
                if !matches!(target, Value::Dict(_))
                    || !matches!(state, Value::Dict(_) | Value::None)
                {
                    bail!(
                        "BUILD of a {} with a {} state; only a dict's attributes are accepted",
                        target.kind(),
                        state.kind()
                    );
                }
            }
            _ => bail!(
                "not allowed in a state-dict pickle (a pickle can run code: only the opcodes \
                 torch.save writes for a dict of tensors are read)"
            ),
        }
        Ok(None)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .with_context(|| {
                format!(
                    "the pickle ends inside an argument ({n} bytes wanted at byte {})",
                    self.pos
                )
            })?;
        let b = &self.data[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn push_str(&mut self, n: usize) -> Result<()> {
        let s = std::str::from_utf8(self.take(n)?).context("a string that is not UTF-8")?;
        self.stack.push(Value::Str(s.into()));
        Ok(())
    }

    /// One newline-terminated argument of GLOBAL.
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("the pickle ends inside a GLOBAL name")?;
        let s = std::str::from_utf8(&rest[..n])
            .context("a GLOBAL name that is not UTF-8")?
            .to_string();
        self.pos += n + 1;
        Ok(s)
    }

    fn push_global(&mut self, module: &str, name: &str) -> Result<()> {
        let g = Global::find(module, name).with_context(|| {
            format!(
                "global {module}.{name} is not allowed in a state-dict pickle (a pickle can run \
                 code; allowed: {})",
                Global::ALLOWED
            )
        })?;
        self.stack.push(Value::Global(g));
        Ok(())
    }

    /// The lowest stack index the current MARK lets an opcode pop.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    /// The top of the stack above the current MARK.
    fn top(&self) -> Option<&Value> {
        self.stack[self.floor()..].last()
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            bail!("pops an empty stack (or across a MARK)");
        }
        self.stack.pop().context("pops an empty stack")
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self.marks.pop().context("no MARK to pop to")?;
        Ok(self.stack.split_off(m))
    }

    fn top_dict(&self) -> Result<Dict> {
        match self.top() {
            Some(Value::Dict(d)) => Ok(d.clone()),
            other => bail!(
                "sets an item of a {}, not a dict",
                other.map_or("nothing", Value::kind)
            ),
        }
    }

    fn top_list(&self) -> Result<Rc<RefCell<Vec<Value>>>> {
        match self.top() {
            Some(Value::List(l)) => Ok(l.clone()),
            other => bail!(
                "appends to a {}, not a list",
                other.map_or("nothing", Value::kind)
            ),
        }
    }

    fn put(&mut self, i: u32) -> Result<()> {
        let v = self.top().context("memoizes an empty stack")?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn get(&mut self, i: u32) -> Result<()> {
        let v = self
            .memo
            .get(&i)
            .with_context(|| format!("memo entry {i} was never stored"))?
            .clone();
        self.stack.push(v);
        Ok(())
    }
}

/// BINPERSID's argument: `('storage', torch.<T>Storage, key, location, numel)`.
fn persistent_storage(pid: &Value) -> Result<StorageRef> {
    let Value::Tuple(t) = pid else {
        bail!("persistent id is a {}, not a tuple", pid.kind());
    };
    match t.as_slice() {
        [
            Value::Str(tag),
            Value::Global(Global::Storage(dtype)),
            Value::Str(key),
            Value::Str(_location),
            Value::Int(numel),
        ] if &**tag == "storage" => Ok(StorageRef {
            dtype: *dtype,
            key: key.to_string(),
            numel: usize::try_from(*numel)
                .with_context(|| format!("storage {key} has {numel} elements"))?,
        }),
        _ => bail!(
            "persistent id ({}) is not ('storage', torch.<Type>Storage, key, location, numel)",
            t.iter().map(Value::kind).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// REDUCE: call one of the allowed globals, by its meaning, on `args`.
fn reduce(func: &Value, args: &Value) -> Result<Value> {
    let (Value::Global(g), Value::Tuple(args)) = (func, args) else {
        bail!(
            "calls a {} with a {}; only allowed globals with argument tuples are called",
            func.kind(),
            args.kind()
        );
    };
    match (g, args.as_slice()) {
        (Global::OrderedDict, []) => Ok(Value::Dict(Rc::default())),
        // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
        (Global::RebuildTensorV2, [Value::Storage(s), offset, size, stride, _grad, _hooks, ..])
            if args.len() <= 7 =>
        {
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: s.clone(),
                offset: non_negative(offset, "storage offset")?,
                shape: int_tuple(size, "size")?,
                stride: int_tuple(stride, "stride")?,
            })))
        }
        // (data, requires_grad, backward_hooks): an nn.Parameter saved with keep_vars=True.
        (Global::RebuildParameter, [t @ Value::Tensor(_), _grad, _hooks]) => Ok(t.clone()),
        _ => bail!(
            "calls {g:?} with arguments ({}), which torch.save does not write",
            args.iter().map(Value::kind).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn non_negative(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).with_context(|| format!("{what} {i} is negative")),
        other => bail!("{what} is a {}, not an int", other.kind()),
    }
}

fn int_tuple(v: &Value, what: &str) -> Result<Vec<usize>> {
    let Value::Tuple(t) = v else {
        bail!("{what} is a {}, not a tuple", v.kind());
    };
    t.iter().map(|x| non_negative(x, what)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpickle(b: &[u8]) -> Result<Value> {
        Unpickler::new(b).run()
    }

    fn err(b: &[u8]) -> String {
        format!("{:#}", unpickle(b).unwrap_err())
    }

    fn ints(v: &Value) -> Vec<i64> {
        let Value::Tuple(t) = v else {
            panic!("not a tuple: {v:?}")
        };
        t.iter()
            .map(|x| match x {
                Value::Int(i) => *i,
                other => panic!("not an int: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn torch_unpickler_integers_and_strings() {
        let mut p = vec![0x80, 2, b'('];
        p.extend([0x8a, 2, 0xfe, 0xff]); // LONG1 -2
        p.extend([0x8a, 6, 0, 0, 0, 0, 0, 1]); // LONG1 2^40
        p.extend([0x8a, 0]); // LONG1 0 (zero bytes)
        p.extend([b'J', 0xfb, 0xff, 0xff, 0xff]); // BININT -5
        p.extend([b'M', 0xff, 0xff]); // BININT2 65535
        p.extend([b'K', 7, b't', b'.']);
        assert_eq!(
            ints(&unpickle(&p).unwrap()),
            vec![-2, 1 << 40, 0, -5, 65535, 7]
        );
        // SHORT_BINUNICODE and BINUNICODE, UTF-8.
        let p = b"\x80\x02\x8c\x02\xc3\xa9X\x02\x00\x00\x00ab\x86.";
        let Value::Tuple(t) = &unpickle(p).unwrap() else {
            panic!()
        };
        assert!(
            matches!((&t[0], &t[1]), (Value::Str(a), Value::Str(b)) if &**a == "é" && &**b == "ab")
        );
        assert!(err(&[0x80, 2, 0x8a, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'.']).contains("64 bits"));
        assert!(err(b"\x80\x02X\x01\x00\x00\x00\xff.").contains("not UTF-8"));
    }

    #[test]
    fn torch_unpickler_memo_shares_one_dict() {
        // ( {} BINPUT 0  'a' 1 SETITEM  BINGET 0  TUPLE ): the tuple holds the same dict twice,
        // and the item set through the first is seen through the second.
        let p = b"\x80\x02(}q\x00X\x01\x00\x00\x00aK\x01sh\x00t.";
        let Value::Tuple(t) = &unpickle(p).unwrap() else {
            panic!()
        };
        let (Value::Dict(a), Value::Dict(b)) = (&t[0], &t[1]) else {
            panic!("{t:?}")
        };
        assert!(Rc::ptr_eq(a, b));
        assert_eq!(b.borrow().len(), 1);
        // SETITEM with an existing key replaces it, as in Python.
        let p = b"\x80\x02}X\x01\x00\x00\x00aK\x01sX\x01\x00\x00\x00aK\x02s.";
        let Value::Dict(d) = &unpickle(p).unwrap() else {
            panic!()
        };
        let d = d.borrow();
        assert_eq!(d.len(), 1);
        assert!(matches!(d[0].1, Value::Int(2)));
        assert!(err(b"\x80\x02h\x05.").contains("memo entry 5 was never stored"));
    }

    #[test]
    fn torch_unpickler_drops_deep_nesting_without_overflow() {
        // A million nested 1-tuples in a megabyte: returned, or left on the stack by an error.
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85, 1_000_000));
        let mut ok = p.clone();
        ok.push(b'.');
        assert!(matches!(unpickle(&ok).unwrap(), Value::Tuple(_)));
        p.push(b'i');
        assert!(err(&p).contains("INST"));
    }

    #[test]
    fn torch_unpickler_respects_marks_and_stack_bounds() {
        let e = err(b"\x80\x02K\x01(\x85.");
        assert!(e.contains("TUPLE1") && e.contains("at byte 5"), "{e}");
        let e = err(b"\x80\x02K\x01(R.");
        assert!(e.contains("REDUCE") && e.contains("across a MARK"), "{e}");
        let e = err(b"\x80\x02t.");
        assert!(e.contains("no MARK"), "{e}");
        let e = err(b"\x80\x02K");
        assert!(e.contains("ends inside an argument"), "{e}");
        let e = err(b"\x80\x02K\x01");
        assert!(e.contains("ends at byte 4 without STOP"), "{e}");
        let e = err(b"\x80\x06.");
        assert!(e.contains("protocol 6"), "{e}");
    }

    #[test]
    fn torch_unpickler_refuses_other_opcodes_and_globals() {
        for (p, names) in [
            (
                &b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R."[..],
                &["os.system", "GLOBAL ('c', 0x63) at byte 2"][..],
            ),
            (b"\x80\x02c__builtin__\neval\n.", &["__builtin__.eval"]),
            (b"\x80\x02cbuiltins\ngetattr\n.", &["builtins.getattr"]),
            (b"\x80\x02ctorch\nload\n.", &["torch.load"]),
            (
                b"\x80\x02ctorch._utils\n_rebuild_tensor\n.",
                &["torch._utils._rebuild_tensor "],
            ),
            (
                b"\x80\x02ctorch\nUntypedStorage\n.",
                &["torch.UntypedStorage"],
            ),
            (
                b"\x80\x04\x8c\x02os\x8c\x06system\x93.",
                &["os.system", "STACK_GLOBAL (0x93) at byte 14"],
            ),
            (b"\x80\x02(cos\nsystem\ni.", &["os.system"]),
            (b"\x80\x02(i.", &["INST", "at byte 3", "not allowed"]),
            (b"\x80\x02N)\x81.", &["NEWOBJ", "at byte 4"]),
            (b"\x80\x02(S'x'\n.", &["STRING"]),
            (b"\x80\x02\x99.", &["unknown opcode", "0x99"]),
        ] {
            let e = err(p);
            for n in names {
                assert!(e.contains(n), "{n} not in: {e}");
            }
        }
        // Allowed globals called with arguments torch.save never writes.
        let e = err(b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.");
        assert!(e.contains("OrderedDict") && e.contains("(int)"), "{e}");
        let e = err(b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nK\x01\x85R.");
        assert!(e.contains("RebuildTensorV2"), "{e}");
        // A persistent id that is not a storage.
        let e = err(b"\x80\x02X\x01\x00\x00\x00xQ.");
        assert!(e.contains("persistent id is a str"), "{e}");
    }

    fn archive(record_bytes: usize) -> Archive {
        Archive {
            prefix: "m".into(),
            data_pkl: 0..0,
            storages: HashMap::from([("0".to_string(), 100..100 + record_bytes)]),
        }
    }

    fn tensor(numel: usize, offset: usize, shape: &[usize], stride: &[usize]) -> TensorRef {
        TensorRef {
            storage: Rc::new(StorageRef {
                dtype: Dtype::F32,
                key: "0".into(),
                numel,
            }),
            offset,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
        }
    }

    #[test]
    fn torch_tensor_byte_ranges_honour_offset_stride_and_bounds() {
        let a = archive(16);
        let e = a.tensor_entry(&tensor(4, 1, &[3], &[1])).unwrap();
        assert_eq!((e.start, e.end, e.shape.clone()), (104, 116, vec![3]));
        let e = a.tensor_entry(&tensor(4, 0, &[2, 2], &[2, 1])).unwrap();
        assert_eq!((e.start, e.end), (100, 116));
        // A size-1 dimension may have any stride; an empty tensor any offset.
        let e = a.tensor_entry(&tensor(4, 0, &[1, 4], &[7, 1])).unwrap();
        assert_eq!((e.start, e.end), (100, 116));
        let e = a.tensor_entry(&tensor(4, 9, &[0, 3], &[3, 1])).unwrap();
        assert_eq!(e.start, e.end);
        let e = a.tensor_entry(&tensor(4, 0, &[], &[])).unwrap();
        assert_eq!((e.start, e.end), (100, 104));

        let msg = |t: TensorRef| format!("{:#}", a.tensor_entry(&t).err().unwrap());
        let m = msg(tensor(4, 2, &[3], &[1]));
        assert!(
            m.contains("spans elements 2..5 of storage 0, which has 4"),
            "{m}"
        );
        let m = msg(tensor(4, 0, &[2, 2], &[1, 2]));
        assert!(m.contains("non-contiguous") && m.contains("[1, 2]"), "{m}");
        let m = msg(tensor(4, 0, &[2], &[2]));
        assert!(m.contains("non-contiguous"), "{m}");
        let m = msg(tensor(5, 0, &[4], &[1]));
        assert!(
            m.contains("holds 16 bytes") && m.contains("5 elements"),
            "{m}"
        );
        let m = msg(tensor(4, 0, &[4], &[1, 1]));
        assert!(m.contains("differ in length"), "{m}");
        let mut t = tensor(4, 0, &[4], &[1]);
        Rc::get_mut(&mut t.storage).unwrap().key = "7".into();
        let m = msg(t);
        assert!(m.contains("no record m/data/7"), "{m}");
    }

    #[test]
    fn torch_every_changed_byte_of_a_real_file_is_an_error_or_a_state_dict() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch_bin/f32")
            .join(TORCH_SINGLE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        assert!(entries(&path, &bytes).unwrap().len() >= 8);
        let mut b = bytes.clone();
        for pos in 0..bytes.len() {
            for v in [0x00, 0x80, 0xff, b'(', b'q', b'h'] {
                b[pos] = v;
                let _ = entries(&path, &b);
            }
            b[pos] = bytes[pos];
        }
    }
}
