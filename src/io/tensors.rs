//! safetensors in and out: one file, or a Hugging Face directory (single `model.safetensors` or
//! shards with `model.safetensors.index.json`), laid out exactly as transformers writes them.
//! A directory holding only PyTorch weights (`pytorch_model.bin` or its shards) loads the same
//! way through `torch_bin`, which turns each tensor into a byte range of the mapped file.
//!
//! Loading memory-maps the files ([`MappedTensors`]) and decodes bf16/f16/f32 to f32 in parallel,
//! a whole tensor or only a range of its rows or columns (a tensor-parallel rank's slice), so the
//! resident peak is what was asked for plus the one tensor being read.
//! Saving streams tensors through a bounded conversion buffer into a temporary file that is
//! fsynced and renamed, so a crash never leaves a half-written file under a final name.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use memmap2::{Mmap, UncheckedAdvice};
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use super::atomic::{AtomicFile, sync_dir, write_atomic};
use super::torch_bin::{self, TORCH_INDEX_FILE, TORCH_SINGLE_FILE, is_torch_file};
use super::{DType, HostTensor, TensorMap};

/// The single-file weights name transformers uses.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name transformers uses.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Elements per parallel work item when converting between f32 and the file dtype.
const CONVERT_CHUNK: usize = 1 << 16;
/// Elements converted per write when saving: bounds the conversion buffer (16 MiB at f32).
const WRITE_BLOCK: usize = 1 << 22;

/// Load one .safetensors file; bf16/f16/f32 are converted to f32, any other dtype is an error.
pub fn load_safetensors_file(path: &Path) -> Result<TensorMap> {
    MappedTensors::open_file(path)?.read_all()
}

/// Load every tensor of a HF model directory: `model.safetensors` (preferred when present, as in
/// transformers), else the shards listed in `model.safetensors.index.json`, else PyTorch weights
/// (`pytorch_model.bin`, else the shards of `pytorch_model.bin.index.json`). The index and the
/// shards must agree exactly: a tensor the index promises but its shard lacks, or a tensor a
/// shard holds that the index does not map to it, is an error.
pub fn load_safetensors_dir(dir: &Path) -> Result<TensorMap> {
    MappedTensors::open_dir(dir)?.read_all()
}

/// The tensors of one safetensors file or a HF directory, memory-mapped: opening reads only the
/// headers; a tensor, or a range of its rows or columns, is decoded when asked for, and the pages
/// it touched are handed back to the kernel afterwards (`MADV_DONTNEED`), so a tensor-parallel
/// rank's resident memory is its own slices plus the one tensor being read, never the model.
pub struct MappedTensors {
    files: Vec<MappedFile>,
    /// name -> (index into `files`, where the tensor lies)
    tensors: BTreeMap<String, (usize, TensorEntry)>,
}

struct MappedFile {
    path: PathBuf,
    /// `None` for an empty file (which cannot be mapped; it is rejected when parsed).
    map: Option<Mmap>,
}

#[derive(Clone)]
pub(super) struct TensorEntry {
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    /// Byte range of the data in the file.
    pub(super) start: usize,
    pub(super) end: usize,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("weights file {} does not exist", path.display());
        }
        let file = fs::File::open(path)
            .with_context(|| format!("reading weights file {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading weights file {}", path.display()))?
            .len();
        // SAFETY: the map is read-only; a file truncated by another process while mapped would
        // fault, as with every memory-mapped reader (transformers' safetensors included).
        let map = if len == 0 {
            None
        } else {
            Some(
                unsafe { Mmap::map(&file) }
                    .with_context(|| format!("memory-mapping weights file {}", path.display()))?,
            )
        };
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
        })
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Every tensor of the file with its absolute byte range; the file is validated whole
    /// (header, offsets, length) as `SafeTensors::deserialize` does, a PyTorch file (.bin, .pt,
    /// .pth) by `torch_bin`'s restricted unpickler.
    fn entries(&self) -> Result<Vec<(String, TensorEntry)>> {
        if is_torch_file(&self.path) {
            let entries = torch_bin::entries(&self.path, self.bytes())?;
            for (name, e) in &entries {
                dtype_size(name, e.dtype, &self.path)?;
            }
            return Ok(entries);
        }
        let st = SafeTensors::deserialize(self.bytes()).with_context(|| {
            format!(
                "{} is not a valid safetensors file (corrupt or truncated?)",
                self.path.display()
            )
        })?;
        let base = self.bytes().as_ptr() as usize;
        st.iter()
            .map(|(name, view)| {
                // Every tensor's dtype is checked here, before any is read.
                dtype_size(name, view.dtype(), &self.path)?;
                let start = view.data().as_ptr() as usize - base;
                let entry = TensorEntry {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    start,
                    end: start + view.data().len(),
                };
                Ok((name.to_string(), entry))
            })
            .collect()
    }

    /// Drop the pages of `range` from this process (they stay in the page cache).
    fn release(&self, range: std::ops::Range<usize>) {
        if let Some(map) = &self.map
            && !range.is_empty()
        {
            // SAFETY: no slice of this range outlives the read that just decoded it; the map is
            // a private read-only file mapping, so dropped pages read back from the file.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len())
            };
        }
    }
}

impl MappedTensors {
    /// One safetensors file, or a PyTorch state-dict file (.bin, .pt, .pth).
    pub fn open_file(path: &Path) -> Result<Self> {
        let file = MappedFile::open(path)?;
        let tensors = file
            .entries()?
            .into_iter()
            .map(|(name, e)| (name, (0, e)))
            .collect();
        Ok(MappedTensors {
            files: vec![file],
            tensors,
        })
    }

    /// A HF model directory, as [`load_safetensors_dir`] reads it (same checks, same errors).
    pub fn open_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "model directory {} does not exist or is not a directory",
                dir.display()
            );
        }
        // transformers' order: safetensors (single, then sharded) before PyTorch weights.
        let names = [SINGLE_FILE, INDEX_FILE, TORCH_SINGLE_FILE, TORCH_INDEX_FILE];
        let Some(found) = names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) else {
            bail!(
                "model directory {} has none of {}",
                dir.display(),
                names.join(", ")
            );
        };
        if !found.to_string_lossy().ends_with(".index.json") {
            return Self::open_file(&found);
        }
        let index = found;
        let weight_map = read_weight_map(&index)?;

        let mut by_shard: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (name, shard) in &weight_map {
            by_shard.entry(shard).or_default().insert(name);
        }
        // Check every shard exists before mapping any.
        for (shard, names) in &by_shard {
            let path = dir.join(shard);
            if !path.is_file() {
                let first = names.first().copied().unwrap_or_default();
                bail!(
                    "{} maps tensor {first} ({} tensors in all) to shard {}, which does not exist",
                    index.display(),
                    names.len(),
                    path.display()
                );
            }
        }

        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (shard, names) in &by_shard {
            let file = MappedFile::open(&dir.join(shard))?;
            let entries = file.entries()?;
            let held: BTreeSet<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
            if let Some(missing) = names.difference(&held).next() {
                bail!(
                    "tensor {missing} is missing from shard {} ({} maps it there)",
                    file.path.display(),
                    index.display()
                );
            }
            if let Some(extra) = held.difference(names).next() {
                let mapped = match weight_map.get(*extra) {
                    Some(other) => format!("maps it to {other}"),
                    None => "does not list it".to_string(),
                };
                bail!(
                    "shard {} holds tensor {extra} but {} {mapped}",
                    file.path.display(),
                    index.display()
                );
            }
            let k = files.len();
            for (name, e) in entries {
                tensors.insert(name, (k, e));
            }
            files.push(file);
        }
        Ok(MappedTensors { files, tensors })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape of tensor `name` as stored, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, e)| e.shape.as_slice())
    }

    /// Every tensor, whole.
    pub fn read_all(&self) -> Result<TensorMap> {
        self.names()
            .map(|n| Ok((n.to_string(), self.read(n)?)))
            .collect()
    }

    /// Tensor `name`, whole.
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let (_, e) = self.entry(name)?;
        let rows = e.shape.first().copied().unwrap_or(1);
        if e.shape.is_empty() {
            // A scalar: one element, no row dimension.
            let data = self.decode_range(name, 0..1)?;
            return Ok(HostTensor::new(vec![], data));
        }
        self.read_rows(name, 0..rows)
    }

    /// Rows `rows` (along the first dimension) of tensor `name`: one contiguous byte range.
    pub fn read_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Result<HostTensor> {
        let (_, e) = self.entry(name)?;
        let Some(&n_rows) = e.shape.first() else {
            bail!("tensor {name} is a scalar; it has no rows to slice");
        };
        if rows.start > rows.end || rows.end > n_rows {
            bail!(
                "tensor {name} has {n_rows} rows; rows {}..{} were asked for",
                rows.start,
                rows.end
            );
        }
        let row: usize = e.shape[1..].iter().product();
        let data = self.decode_range(name, rows.start * row..rows.end * row)?;
        let mut shape = e.shape.clone();
        shape[0] = rows.len();
        Ok(HostTensor::new(shape, data))
    }

    /// Columns `cols` (along the second dimension) of the 2-D tensor `name`: one range per row.
    pub fn read_cols(&self, name: &str, cols: std::ops::Range<usize>) -> Result<HostTensor> {
        let (k, e) = self.entry(name)?;
        let &[n_rows, n_cols] = e.shape.as_slice() else {
            bail!(
                "tensor {name} has shape {:?}; a column range needs a 2-D tensor",
                e.shape
            );
        };
        if cols.start > cols.end || cols.end > n_cols {
            bail!(
                "tensor {name} has {n_cols} columns; columns {}..{} were asked for",
                cols.start,
                cols.end
            );
        }
        let size = dtype_size(name, e.dtype, &self.files[k].path)?;
        let bytes = &self.files[k].bytes()[e.start..e.end];
        let w = cols.len();
        let mut out = vec![0f32; n_rows * w];
        out.par_chunks_mut(w.max(1)).enumerate().for_each(|(r, o)| {
            let b = &bytes[(r * n_cols + cols.start) * size..(r * n_cols + cols.end) * size];
            decode_into(e.dtype, b, o);
        });
        self.files[k].release(e.start..e.end);
        Ok(HostTensor::new(vec![n_rows, w], out))
    }

    fn entry(&self, name: &str) -> Result<(usize, &TensorEntry)> {
        let (k, e) = self.tensors.get(name).with_context(|| {
            format!(
                "tensor {name} is not in {}",
                self.files
                    .first()
                    .map(|f| f.path.display().to_string())
                    .unwrap_or_default()
            )
        })?;
        Ok((*k, e))
    }

    /// Elements `elems` of tensor `name` (flat, row-major), decoded to f32.
    fn decode_range(&self, name: &str, elems: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let (k, e) = self.entry(name)?;
        let file = &self.files[k];
        let size = dtype_size(name, e.dtype, &file.path)?;
        let range = e.start + elems.start * size..e.start + elems.end * size;
        let mut out = vec![0f32; elems.len()];
        out.par_chunks_mut(CONVERT_CHUNK)
            .zip(file.bytes()[range.clone()].par_chunks(CONVERT_CHUNK * size))
            .for_each(|(o, b)| decode_into(e.dtype, b, o));
        file.release(range);
        Ok(out)
    }
}

/// Bytes per element of a file dtype we read; any other dtype is an error naming the tensor.
fn dtype_size(name: &str, dtype: Dtype, path: &Path) -> Result<usize> {
    match dtype {
        Dtype::F32 => Ok(4),
        Dtype::BF16 | Dtype::F16 => Ok(2),
        other => bail!(
            "tensor {name} in {} has dtype {other:?}; expected F32, BF16 or F16",
            path.display()
        ),
    }
}

/// Little-endian `dtype` words of `bytes` -> f32 into `out` (same length in elements).
fn decode_into(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    fn words<const N: usize>(bytes: &[u8], out: &mut [f32], word: impl Fn([u8; N]) -> f32) {
        for (x, w) in out.iter_mut().zip(bytes.chunks_exact(N)) {
            let mut a = [0u8; N];
            a.copy_from_slice(w);
            *x = word(a);
        }
    }
    match dtype {
        Dtype::F32 => words::<4>(bytes, out, f32::from_le_bytes),
        Dtype::BF16 => words::<2>(bytes, out, |b| {
            bf16::from_bits(u16::from_le_bytes(b)).to_f32()
        }),
        Dtype::F16 => words::<2>(bytes, out, |b| {
            f16::from_bits(u16::from_le_bytes(b)).to_f32()
        }),
        _ => unreachable!("dtype_size rejected {dtype:?} before decoding"),
    }
}

/// Save one .safetensors file (tmp + rename), with optional string metadata (`__metadata__`).
/// Tensors are laid out in name order, as the safetensors crate and Python package do.
pub fn save_safetensors_file(
    path: &Path,
    tensors: &TensorMap,
    dtype: DType,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    write_safetensors(path, tensors, &names, dtype, metadata)
}

/// Save tensors in HF layout. If they fit in `max_shard_bytes` (in `dtype`), one
/// `model.safetensors`; else shards `model-0000i-of-0000N.safetensors` filled greedily in name
/// order (a tensor larger than the limit gets a shard of its own) plus the index, as transformers
/// writes them, with file metadata {"format": "pt"}. Shards and index of an earlier save with a
/// different layout are removed once the new files are in place; until then a reader still
/// finds a complete model, because `model.safetensors` wins over an index.
pub fn save_safetensors_dir(
    dir: &Path,
    tensors: &TensorMap,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let (shards, total_size) = plan_shards(tensors, dtype, max_shard_bytes)?;
    let pt = || Some(HashMap::from([("format".to_string(), "pt".to_string())]));

    if shards.len() <= 1 {
        let names = shards.into_iter().next().unwrap_or_default();
        write_safetensors(&dir.join(SINGLE_FILE), tensors, &names, dtype, pt())?;
        remove_stale_weights(dir, &BTreeSet::from([SINGLE_FILE.to_string()]))?;
    } else {
        let n = shards.len();
        let mut weight_map = BTreeMap::new();
        let mut keep = BTreeSet::new();
        for (i, names) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            write_safetensors(&dir.join(&file), tensors, names, dtype, pt())?;
            for name in names {
                weight_map.insert(*name, file.clone());
            }
            keep.insert(file);
        }
        #[derive(Serialize)]
        struct IndexMetadata {
            total_size: u64,
        }
        #[derive(Serialize)]
        struct Index<'a> {
            metadata: IndexMetadata,
            weight_map: BTreeMap<&'a str, String>,
        }
        let index = Index {
            metadata: IndexMetadata { total_size },
            weight_map,
        };
        // transformers: json.dumps(index, indent=2, sort_keys=True) + "\n".
        let mut text = serde_json::to_string_pretty(&index).context("serializing shard index")?;
        text.push('\n');
        keep.insert(INDEX_FILE.to_string());
        write_atomic(&dir.join(INDEX_FILE), text.as_bytes())?;
        remove_stale_weights(dir, &keep)?;
    }
    sync_dir(dir)
}

/// The `weight_map` of a shard index: tensor name -> shard file name (a plain name in the
/// same directory; anything with a path component is rejected).
fn read_weight_map(index: &Path) -> Result<BTreeMap<String, String>> {
    let text = fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| {
            format!(
                "{} has no \"weight_map\" object (tensor name -> shard file)",
                index.display()
            )
        })?;
    if map.is_empty() {
        bail!("{} has an empty \"weight_map\"", index.display());
    }
    let mut out = BTreeMap::new();
    for (name, shard) in map {
        let shard = shard.as_str().with_context(|| {
            format!(
                "{}: weight_map[\"{name}\"] is {shard}; expected a shard file name string",
                index.display()
            )
        })?;
        let mut parts = Path::new(shard).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        ) {
            bail!(
                "{}: weight_map[\"{name}\"] is \"{shard}\"; expected a file name in the same directory",
                index.display()
            );
        }
        out.insert(name.clone(), shard.to_string());
    }
    Ok(out)
}

/// f32 -> little-endian bytes of `dtype` (round to nearest even for bf16/f16), in parallel.
fn encode_into(data: &[f32], dtype: DType, out: &mut Vec<u8>) {
    let n = dtype.size_bytes();
    out.clear();
    out.resize(data.len() * n, 0);
    out.par_chunks_mut(CONVERT_CHUNK * n)
        .zip(data.par_chunks(CONVERT_CHUNK))
        .for_each(|(o, d)| {
            let words = o.chunks_exact_mut(n).zip(d);
            match dtype {
                DType::F32 => words.for_each(|(w, x)| w.copy_from_slice(&x.to_le_bytes())),
                DType::BF16 => words.for_each(|(w, x)| {
                    w.copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes())
                }),
                DType::F16 => words.for_each(|(w, x)| {
                    w.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes())
                }),
            }
        });
}

/// Elements of `shape`, checked against the data length (the fields of HostTensor are public,
/// so a caller can build an inconsistent one).
fn checked_numel(name: &str, t: &HostTensor) -> Result<usize> {
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .with_context(|| format!("tensor {name}: shape {:?} overflows usize", t.shape))?;
    if numel != t.data.len() {
        bail!(
            "tensor {name}: shape {:?} has {numel} elements but data holds {}",
            t.shape,
            t.data.len()
        );
    }
    Ok(numel)
}

/// Greedy sharding in name order: start a new shard when the next tensor would overflow the
/// current one. Returns the shards and the total byte size in `dtype`.
fn plan_shards(
    tensors: &TensorMap,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<(Vec<Vec<&str>>, u64)> {
    let mut shards = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut current_size = 0u64;
    let mut total = 0u64;
    for (name, t) in tensors {
        let size = checked_numel(name, t)? as u64 * dtype.size_bytes() as u64;
        if !current.is_empty() && current_size + size > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(name.as_str());
        current_size += size;
        total += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    Ok((shards, total))
}

/// Write `names` (in this order) from `tensors` to a safetensors file at `path` via tmp + rename.
fn write_safetensors(
    path: &Path,
    tensors: &TensorMap,
    names: &[&str],
    dtype: DType,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut infos = Vec::with_capacity(names.len());
    let mut offset = 0usize;
    for &name in names {
        let t = tensors
            .get(name)
            .with_context(|| format!("internal: tensor {name} not in the map being saved"))?;
        let bytes = checked_numel(name, t)? * dtype.size_bytes();
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype: dtype.safetensors_dtype(),
                shape: t.shape.clone(),
                data_offsets: (offset, offset + bytes),
            },
        ));
        offset += bytes;
    }
    let header = Metadata::new(metadata, infos)
        .with_context(|| format!("building the safetensors header of {}", path.display()))?;
    let mut header = serde_json::to_vec(&header)
        .with_context(|| format!("serializing the safetensors header of {}", path.display()))?;
    // The safetensors writers pad the header with spaces so the data starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut file = AtomicFile::create(path)?;
    let tmp = file.tmp_path().to_path_buf();
    let ctx = || format!("writing {} (for {})", tmp.display(), path.display());
    {
        let mut w = BufWriter::with_capacity(1 << 20, file.file());
        w.write_all(&(header.len() as u64).to_le_bytes())
            .with_context(ctx)?;
        w.write_all(&header).with_context(ctx)?;
        let mut buf = Vec::new();
        for &name in names {
            let t = &tensors[name];
            for block in t.data.chunks(WRITE_BLOCK) {
                encode_into(block, dtype, &mut buf);
                w.write_all(&buf).with_context(ctx)?;
            }
        }
        w.flush().with_context(ctx)?;
    }
    file.commit()
}

/// Is `name` a transformers shard of ours, `model-DDDDD-of-DDDDD.safetensors`?
fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name
        .strip_prefix("model-")
        .and_then(|s| s.strip_suffix(".safetensors"))
    else {
        return false;
    };
    let b = mid.as_bytes();
    b.len() == 14
        && b[..5].iter().all(u8::is_ascii_digit)
        && &b[5..9] == b"-of-"
        && b[9..].iter().all(u8::is_ascii_digit)
}

/// Remove weights files of an earlier save (single file, shards, index) that are not in `keep`.
fn remove_stale_weights(dir: &Path, keep: &BTreeSet<String>) -> Result<()> {
    let entries = fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let ours = name == SINGLE_FILE || name == INDEX_FILE || is_shard_name(&name);
        if ours && !keep.contains(&name) {
            let path = entry.path();
            fs::remove_file(&path)
                .with_context(|| format!("removing stale weights file {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], data: Vec<f32>) -> HostTensor {
        HostTensor::new(shape.to_vec(), data)
    }

    /// A small model-like map with awkward values (subnormals, infinities, ties).
    fn sample() -> TensorMap {
        let mut m = TensorMap::new();
        m.insert(
            "model.embed_tokens.weight".into(),
            t(&[3, 4], (0..12).map(|i| i as f32 * 0.37 - 2.0).collect()),
        );
        m.insert(
            "model.layers.0.self_attn.q_proj.weight".into(),
            t(
                &[2, 3],
                vec![
                    1.0,
                    -0.0,
                    1.0 + 2f32.powi(-8),
                    f32::INFINITY,
                    1e-40,
                    65504.0,
                ],
            ),
        );
        m.insert(
            "model.layers.0.input_layernorm.weight".into(),
            t(&[5], vec![1.0, 0.5, -3.25, 7.0, 1.0 + 3.0 * 2f32.powi(-8)]),
        );
        m.insert("model.norm.weight".into(), t(&[4], vec![1.0; 4]));
        m.insert(
            "lm_head.weight".into(),
            t(&[2, 2], vec![0.1, 0.2, 0.3, 0.4]),
        );
        m.insert("scalar".into(), t(&[], vec![3.5]));
        m.insert("empty".into(), t(&[0, 4], vec![]));
        m
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn round(m: &TensorMap, f: impl Fn(f32) -> f32) -> TensorMap {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    HostTensor::new(v.shape.clone(), v.data.iter().map(|&x| f(x)).collect()),
                )
            })
            .collect()
    }

    fn assert_same_bits(a: &TensorMap, b: &TensorMap) {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, x) in a {
            let y = &b[k];
            assert_eq!(x.shape, y.shape, "{k}");
            let xb: Vec<u32> = x.data.iter().map(|v| v.to_bits()).collect();
            let yb: Vec<u32> = y.data.iter().map(|v| v.to_bits()).collect();
            assert_eq!(xb, yb, "{k}");
        }
    }

    #[test]
    fn f32_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        save_safetensors_dir(dir.path(), &m, DType::F32, u64::MAX).unwrap();
        assert_eq!(file_names(dir.path()), vec![SINGLE_FILE]);
        assert_same_bits(&load_safetensors_dir(dir.path()).unwrap(), &m);
        // The file says {"format": "pt"} like transformers, and is in F32.
        let bytes = fs::read(dir.path().join(SINGLE_FILE)).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let want = HashMap::from([("format".to_string(), "pt".to_string())]);
        assert_eq!(meta.metadata().as_ref(), Some(&want));
        assert!(meta.tensors().values().all(|i| i.dtype == Dtype::F32));
        // The data starts 8-byte aligned.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(n % 8, 0);
    }

    #[test]
    fn bf16_round_trip_rounds_to_nearest_even() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        let p = dir.path().join("w.safetensors");
        save_safetensors_file(&p, &m, DType::BF16, None).unwrap();
        let got = load_safetensors_file(&p).unwrap();
        assert_same_bits(&got, &round(&m, |x| bf16::from_f32(x).to_f32()));
        let q = &got["model.layers.0.self_attn.q_proj.weight"].data;
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa, 1.0.
        assert_eq!(q[2], 1.0);
        // 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up, not truncated.
        assert_eq!(
            got["model.layers.0.input_layernorm.weight"].data[4],
            1.015625
        );
        // Values bf16 represents come back unchanged.
        assert_eq!(q[0], 1.0);
        assert_eq!(q[3], f32::INFINITY);
        assert!(q[1] == 0.0 && q[1].is_sign_negative());
        assert_eq!(
            got["model.layers.0.input_layernorm.weight"].data[..4],
            [1.0, 0.5, -3.25, 7.0]
        );
        assert_eq!(got["scalar"].data, vec![3.5]);
        assert_eq!(got["scalar"].shape, Vec::<usize>::new());
        assert_eq!(got["empty"].shape, vec![0, 4]);
    }

    #[test]
    fn f16_round_trip_rounds_to_nearest_even() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        // 1 + 2^-11 ties to 1.0; 1 + 3*2^-11 ties up to 1 + 2^-9; 70000 overflows to inf.
        m.insert(
            "ties".into(),
            t(
                &[3],
                vec![1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 70000.0],
            ),
        );
        let p = dir.path().join("w.safetensors");
        save_safetensors_file(&p, &m, DType::F16, None).unwrap();
        let got = load_safetensors_file(&p).unwrap();
        assert_same_bits(&got, &round(&m, |x| f16::from_f32(x).to_f32()));
        assert_eq!(
            got["ties"].data,
            vec![1.0, 1.0 + 2f32.powi(-9), f32::INFINITY]
        );
        let q = &got["model.layers.0.self_attn.q_proj.weight"].data;
        assert_eq!(q[5], 65504.0); // f16 max, representable
        assert_eq!(q[4], 0.0); // 1e-40 is far below the smallest f16 subnormal
    }

    #[test]
    fn large_tensor_crosses_conversion_chunks_and_write_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let n = WRITE_BLOCK + CONVERT_CHUNK + 7;
        let data: Vec<f32> = (0..n).map(|i| (i as f32).sin() * 100.0).collect();
        let mut m = TensorMap::new();
        m.insert("big".into(), t(&[n], data));
        let p = dir.path().join("big.safetensors");
        save_safetensors_file(&p, &m, DType::BF16, None).unwrap();
        let got = load_safetensors_file(&p).unwrap();
        assert_same_bits(&got, &round(&m, |x| bf16::from_f32(x).to_f32()));
    }

    #[test]
    fn sharded_save_writes_index_and_loads_back_then_unsharded_save_removes_shards() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        // Sizes in bf16: embed 24, q 12, norm 8, layernorm 10, lm_head 8, scalar 2, empty 0.
        save_safetensors_dir(dir.path(), &m, DType::BF16, 20).unwrap();
        let names = file_names(dir.path());
        assert!(!names.contains(&SINGLE_FILE.to_string()));
        assert!(names.contains(&INDEX_FILE.to_string()));
        let shards: Vec<&String> = names.iter().filter(|n| is_shard_name(n)).collect();
        assert!(shards.len() >= 3, "{names:?}");
        let n = shards.len();
        for (i, s) in shards.iter().enumerate() {
            assert_eq!(**s, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        }

        let text = fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap();
        assert!(
            text.starts_with("{\n  \"metadata\": {\n    \"total_size\": "),
            "{text}"
        );
        assert!(text.ends_with("}\n"));
        let index: serde_json::Value = serde_json::from_str(&text).unwrap();
        let total: u64 = m.values().map(|t| t.numel() as u64 * 2).sum();
        assert_eq!(index["metadata"]["total_size"], total);
        let wm = index["weight_map"].as_object().unwrap();
        assert_eq!(wm.keys().collect::<Vec<_>>(), m.keys().collect::<Vec<_>>());
        // Each shard holds exactly the tensors the index maps to it, within the limit unless
        // a single tensor alone exceeds it.
        for s in &shards {
            let bytes = fs::read(dir.path().join(s)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let mut held: Vec<String> = st.names().into_iter().map(String::from).collect();
            held.sort();
            let mut mapped: Vec<String> = wm
                .iter()
                .filter(|(_, v)| v.as_str() == Some(s.as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            mapped.sort();
            assert_eq!(held, mapped, "{s}");
            let size: usize = st.iter().map(|(_, v)| v.data().len()).sum();
            assert!(size <= 20 || held.len() == 1, "{s}: {size} bytes");
        }
        // The embedding (24 bytes > 20) sits alone in its shard.
        let embed_shard = wm["model.embed_tokens.weight"].as_str().unwrap();
        assert_eq!(
            wm.values()
                .filter(|v| v.as_str() == Some(embed_shard))
                .count(),
            1
        );

        let got = load_safetensors_dir(dir.path()).unwrap();
        assert_same_bits(&got, &round(&m, |x| bf16::from_f32(x).to_f32()));

        // A different sharding (fewer shards) leaves no stale shard behind.
        save_safetensors_dir(dir.path(), &m, DType::BF16, 40).unwrap();
        let names2 = file_names(dir.path());
        let n2 = names2.iter().filter(|n| is_shard_name(n)).count();
        assert!(n2 >= 2 && n2 < n, "{names2:?}");
        assert!(
            names2
                .iter()
                .filter(|x| is_shard_name(x))
                .all(|x| x.ends_with(&format!("-of-{n2:05}.safetensors")))
        );
        assert_same_bits(
            &load_safetensors_dir(dir.path()).unwrap(),
            &round(&m, |x| bf16::from_f32(x).to_f32()),
        );

        // Unsharded into the same dir: only model.safetensors remains.
        fs::write(dir.path().join("config.json"), b"{}").unwrap();
        save_safetensors_dir(dir.path(), &m, DType::F32, 1 << 30).unwrap();
        assert_eq!(file_names(dir.path()), vec!["config.json", SINGLE_FILE]);
        assert_same_bits(&load_safetensors_dir(dir.path()).unwrap(), &m);

        // And sharded again removes model.safetensors.
        save_safetensors_dir(dir.path(), &m, DType::F32, 20).unwrap();
        let names3 = file_names(dir.path());
        assert!(!names3.contains(&SINGLE_FILE.to_string()), "{names3:?}");
        assert!(names3.contains(&INDEX_FILE.to_string()));
        assert_same_bits(&load_safetensors_dir(dir.path()).unwrap(), &m);
    }

    /// A safetensors file as another producer might write it: header not padded, tensors
    /// listed out of name order, data unaligned.
    fn hand_built(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_hand_built_file_with_bf16_f16_and_f32() {
        let bf: [u16; 4] = [0x3F80, 0xC000, 0x3FC0, 0x7F80]; // 1, -2, 1.5, inf
        let hf: [u16; 4] = [0x3C00, 0xC000, 0x3555, 0x0001]; // 1, -2, 1365/4096, 2^-24
        let mut data = Vec::new();
        for w in hf {
            data.extend_from_slice(&w.to_le_bytes());
        }
        for w in bf {
            data.extend_from_slice(&w.to_le_bytes());
        }
        data.extend_from_slice(&(-0.75f32).to_le_bytes());
        let header = r#"{"h":{"dtype":"F16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},"f":{"dtype":"F32","shape":[1],"data_offsets":[16,20]},"__metadata__":{"producer":"hand"}}"#;
        assert_ne!(header.len() % 2, 0, "keep the data unaligned");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hand.safetensors");
        fs::write(&p, hand_built(header, &data)).unwrap();
        let got = load_safetensors_file(&p).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got["b"].shape, vec![2, 2]);
        assert_eq!(got["b"].data, vec![1.0, -2.0, 1.5, f32::INFINITY]);
        assert_eq!(got["h"].shape, vec![4]);
        assert_eq!(
            got["h"].data,
            vec![1.0, -2.0, 1365.0 / 4096.0, 2f32.powi(-24)]
        );
        assert_eq!(got["f"].data, vec![-0.75]);
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn missing_directory_and_missing_model_file_are_named() {
        let root = tempfile::tempdir().unwrap();
        let gone = root.path().join("no_such_model");
        let e = err_text(load_safetensors_dir(&gone));
        assert!(
            e.contains("no_such_model") && e.contains("does not exist"),
            "{e}"
        );

        let empty = root.path().join("empty_model");
        fs::create_dir(&empty).unwrap();
        let e = err_text(load_safetensors_dir(&empty));
        assert!(
            e.contains("empty_model") && e.contains(SINGLE_FILE) && e.contains(INDEX_FILE),
            "{e}"
        );

        let e = err_text(load_safetensors_file(
            &root.path().join("absent.safetensors"),
        ));
        assert!(e.contains("absent.safetensors"), "{e}");
    }

    #[test]
    fn index_naming_a_missing_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        save_safetensors_dir(dir.path(), &sample(), DType::BF16, 20).unwrap();
        let victim = "model-00002-of-00005.safetensors";
        let names = file_names(dir.path());
        assert!(names.contains(&victim.to_string()), "{names:?}");
        fs::remove_file(dir.path().join(victim)).unwrap();
        let e = err_text(load_safetensors_dir(dir.path()));
        assert!(e.contains(victim) && e.contains(INDEX_FILE), "{e}");
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn tensor_missing_from_shard_and_unlisted_tensor_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        save_safetensors_dir(dir.path(), &m, DType::BF16, 20).unwrap();
        let index_path = dir.path().join(INDEX_FILE);
        let original = fs::read_to_string(&index_path).unwrap();

        // The index promises a tensor that no shard holds.
        let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
        let shard = index["weight_map"]["model.norm.weight"].clone();
        index["weight_map"]["model.ghost.weight"] = shard.clone();
        fs::write(&index_path, index.to_string()).unwrap();
        let e = err_text(load_safetensors_dir(dir.path()));
        let shard = shard.as_str().unwrap();
        assert!(
            e.contains("model.ghost.weight") && e.contains(shard) && e.contains("missing"),
            "{e}"
        );

        // The index forgets a tensor a shard holds.
        let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
        let shard = index["weight_map"]["lm_head.weight"]
            .as_str()
            .unwrap()
            .to_string();
        index["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove("lm_head.weight");
        fs::write(&index_path, index.to_string()).unwrap();
        let e = err_text(load_safetensors_dir(dir.path()));
        assert!(e.contains("lm_head.weight") && e.contains(&shard), "{e}");

        // A weight_map entry that is not a plain file name.
        let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
        index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors".into();
        fs::write(&index_path, index.to_string()).unwrap();
        let e = err_text(load_safetensors_dir(dir.path()));
        assert!(
            e.contains("lm_head.weight") && e.contains(INDEX_FILE),
            "{e}"
        );

        // No weight_map at all.
        fs::write(&index_path, "{\"metadata\": {}}").unwrap();
        let e = err_text(load_safetensors_dir(dir.path()));
        assert!(e.contains("weight_map") && e.contains(INDEX_FILE), "{e}");
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let header = r#"{"ok":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},"position_ids":{"dtype":"I64","shape":[2],"data_offsets":[2,18]}}"#;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ints.safetensors");
        fs::write(&p, hand_built(header, &[0u8; 18])).unwrap();
        let e = err_text(load_safetensors_file(&p));
        assert!(
            e.contains("tensor position_ids in ")
                && e.contains("ints.safetensors")
                && e.contains("has dtype I64; expected F32, BF16 or F16"),
            "{e}"
        );
        // Also through a directory.
        let model = dir.path().join("m");
        fs::create_dir(&model).unwrap();
        fs::copy(&p, model.join(SINGLE_FILE)).unwrap();
        let e = err_text(load_safetensors_dir(&model));
        assert!(e.contains("position_ids") && e.contains(SINGLE_FILE), "{e}");
    }

    #[test]
    fn truncated_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        save_safetensors_file(&p, &sample(), DType::BF16, None).unwrap();
        let bytes = fs::read(&p).unwrap();
        // Cut in the data, in the header, and before the header length.
        for cut in [bytes.len() - 3, 20, 5, 0] {
            fs::write(&p, &bytes[..cut]).unwrap();
            let e = err_text(load_safetensors_file(&p));
            assert!(
                e.contains("model.safetensors") && e.contains("not a valid"),
                "cut {cut}: {e}"
            );
            let e = err_text(load_safetensors_dir(dir.path()));
            assert!(e.contains("model.safetensors"), "cut {cut}: {e}");
        }
        // A header that is not JSON.
        fs::write(&p, hand_built("{not json}", &[])).unwrap();
        let e = err_text(load_safetensors_file(&p));
        assert!(e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn inconsistent_host_tensor_is_refused_on_save() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = TensorMap::new();
        m.insert(
            "bad".into(),
            HostTensor {
                shape: vec![2, 3],
                data: vec![0.0; 5],
            },
        );
        let p = dir.path().join("x.safetensors");
        let e = err_text(save_safetensors_file(&p, &m, DType::F32, None));
        assert!(e.contains("bad") && e.contains("[2, 3]"), "{e}");
        assert!(!p.exists());
        assert!(
            file_names(dir.path()).is_empty(),
            "no temp file left behind"
        );
    }

    #[test]
    fn file_metadata_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let meta = HashMap::from([("step".to_string(), "42".to_string())]);
        save_safetensors_file(&p, &sample(), DType::F32, Some(meta.clone())).unwrap();
        let bytes = fs::read(&p).unwrap();
        let st = SafeTensors::read_metadata(&bytes).unwrap().1;
        assert_eq!(st.metadata().as_ref(), Some(&meta));
    }

    #[test]
    fn shard_name_pattern() {
        assert!(is_shard_name("model-00001-of-00004.safetensors"));
        assert!(!is_shard_name("model-0001-of-00004.safetensors"));
        assert!(!is_shard_name("model-00001-of-00004.bin"));
        assert!(!is_shard_name("adapter-00001-of-00004.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
    }

    #[test]
    fn mapped_row_and_column_ranges_equal_slices_of_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        m.insert(
            "wide".into(),
            t(&[3, 5], (0..15).map(|i| i as f32 * 0.25 - 1.0).collect()),
        );
        save_safetensors_dir(dir.path(), &m, DType::BF16, 16).unwrap();
        let whole = load_safetensors_dir(dir.path()).unwrap();
        let mapped = MappedTensors::open_dir(dir.path()).unwrap();
        let w = &whole["wide"].data;
        let rows = mapped.read_rows("wide", 1..3).unwrap();
        assert_eq!(rows.shape, vec![2, 5]);
        assert_eq!(rows.data, w[5..15].to_vec());
        let cols = mapped.read_cols("wide", 2..4).unwrap();
        assert_eq!(cols.shape, vec![3, 2]);
        assert_eq!(cols.data, vec![w[2], w[3], w[7], w[8], w[12], w[13]]);
        assert_eq!(mapped.read_cols("wide", 0..0).unwrap().shape, vec![3, 0]);
        assert_eq!(mapped.shape("wide"), Some(&[3usize, 5][..]));

        let e = err_text(mapped.read_rows("wide", 2..4));
        assert!(e.contains("has 3 rows; rows 2..4"), "{e}");
        let e = err_text(mapped.read_cols("wide", 4..6));
        assert!(e.contains("has 5 columns; columns 4..6"), "{e}");
        let e = err_text(mapped.read_cols("model.norm.weight", 0..1));
        assert!(e.contains("needs a 2-D tensor"), "{e}");
        let e = err_text(mapped.read("absent"));
        assert!(e.contains("tensor absent is not in"), "{e}");
    }
}
