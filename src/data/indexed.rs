//! Megatron-LM's indexed dataset ("MMIDIDX", megatron/core/datasets/indexed_dataset.py): token
//! sequences back to back in `<prefix>.bin`, and in `<prefix>.idx` the index megatron-core's
//! `IndexedDataset(prefix)` reads.
//!
//! `.idx` layout, little-endian: magic `MMIDIDX\0\0` (9 bytes), version u64 = 1, dtype code u8
//! (Megatron's `DType`), sequence count u64, document count u64, then sizes i32[sequences],
//! pointers i64[sequences] (byte offset of each sequence in `.bin`), document indices
//! i64[documents] (`[0, ..., sequences]`: the sequence index where each document ends, as
//! Megatron's builder `add_document` records it). Multimodal files append one i8 mode per
//! sequence; we accept and ignore it.
//!
//! The reader keeps the (small) index in memory and reads `.bin` at offsets, so token files of
//! any size work without mapping or loading them whole.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail, ensure};

/// The 9-byte magic at the start of every `.idx` file.
pub const INDEX_MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// The only `.idx` version Megatron writes or reads.
pub const INDEX_VERSION: u64 = 1;
/// Magic, version, dtype code, sequence count, document count.
const HEADER_LEN: usize = 9 + 8 + 1 + 8 + 8;

/// Token dtypes we write and read (Megatron's `DType` codes). Llama-3's 128k vocabulary needs
/// `I32`; `U8` holds loss masks; `U16` is what Megatron picks for vocabularies under 65500.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenDType {
    U8,
    I32,
    U16,
}

impl TokenDType {
    /// Megatron's `DType` code: uint8 = 1, int32 = 4, uint16 = 8.
    pub fn code(self) -> u8 {
        match self {
            TokenDType::U8 => 1,
            TokenDType::I32 => 4,
            TokenDType::U16 => 8,
        }
    }

    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenDType::U8 => 1,
            TokenDType::I32 => 4,
            TokenDType::U16 => 2,
        }
    }

    /// The dtype of a Megatron code; `None` for codes we do not support (int8, int16, int64,
    /// float64, float32) or that Megatron does not define.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(TokenDType::U8),
            4 => Some(TokenDType::I32),
            8 => Some(TokenDType::U16),
            _ => None,
        }
    }

    /// Largest token value the dtype holds.
    pub fn max_value(self) -> u32 {
        match self {
            TokenDType::U8 => u8::MAX as u32,
            TokenDType::I32 => i32::MAX as u32,
            TokenDType::U16 => u16::MAX as u32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            TokenDType::U8 => "uint8",
            TokenDType::I32 => "int32",
            TokenDType::U16 => "uint16",
        }
    }
}

/// `<prefix>.bin` / `<prefix>.idx` (the suffix is appended, not substituted, as Megatron does).
fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// The directory holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A hidden temporary name next to `path`, unique per process and call.
fn temp_name(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .with_context(|| format!("cannot write {}: the path names no file", path.display()))?;
    Ok(parent_dir(path).join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir)
        .with_context(|| format!("opening directory {} to fsync it", dir.display()))?;
    d.sync_all()
        .with_context(|| format!("fsync of directory {}", dir.display()))
}

/// Writes a Megatron indexed dataset. Tokens stream to a temporary `.bin`; `finish` writes the
/// index and renames both into place. Dropped without `finish`, it removes its temporary files,
/// so an interrupted writer leaves nothing that looks like a dataset.
pub struct IndexedWriter {
    bin_path: PathBuf,
    idx_path: PathBuf,
    bin_tmp: PathBuf,
    bin: Option<BufWriter<File>>,
    dtype: TokenDType,
    sizes: Vec<i32>,
    document_indices: Vec<i64>,
    bytes: u64,
    buf: Vec<u8>,
}

impl IndexedWriter {
    /// Writes `<prefix>.bin` and `<prefix>.idx` under temporary names; nothing final until finish().
    pub fn create(prefix: &Path, dtype: TokenDType) -> Result<Self> {
        let bin_path = with_suffix(prefix, ".bin");
        let idx_path = with_suffix(prefix, ".idx");
        let bin_tmp = temp_name(&bin_path)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&bin_tmp)
            .with_context(|| {
                format!(
                    "creating temporary file {} to write {}",
                    bin_tmp.display(),
                    bin_path.display()
                )
            })?;
        Ok(Self {
            bin_path,
            idx_path,
            bin_tmp,
            bin: Some(BufWriter::with_capacity(1 << 20, file)),
            dtype,
            sizes: Vec::new(),
            document_indices: vec![0],
            bytes: 0,
            buf: Vec::new(),
        })
    }

    /// Appends one sequence; an error if a token does not fit the dtype (nothing is written then).
    pub fn add_sequence(&mut self, tokens: &[u32]) -> Result<()> {
        let max = self.dtype.max_value();
        if let Some((pos, &t)) = tokens.iter().enumerate().find(|&(_, &t)| t > max) {
            bail!(
                "token {t} at position {pos} of sequence {} does not fit {} (max {max}) in {}",
                self.sizes.len(),
                self.dtype.name(),
                self.bin_path.display()
            );
        }
        let len = i32::try_from(tokens.len()).with_context(|| {
            format!(
                "sequence {} of {} has {} tokens; Megatron's index stores sizes as int32",
                self.sizes.len(),
                self.bin_path.display(),
                tokens.len()
            )
        })?;
        self.buf.clear();
        match self.dtype {
            TokenDType::U8 => self.buf.extend(tokens.iter().map(|&t| t as u8)),
            TokenDType::U16 => {
                for &t in tokens {
                    self.buf.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
            TokenDType::I32 => {
                for &t in tokens {
                    self.buf.extend_from_slice(&(t as i32).to_le_bytes());
                }
            }
        }
        let bin = self.bin.as_mut().expect("IndexedWriter: open until finish");
        bin.write_all(&self.buf)
            .with_context(|| format!("writing {}", self.bin_tmp.display()))?;
        self.bytes += self.buf.len() as u64;
        self.sizes.push(len);
        Ok(())
    }

    /// Ends the current document: records the number of sequences so far (Megatron's
    /// `add_document`).
    pub fn end_document(&mut self) {
        self.document_indices.push(self.sizes.len() as i64);
    }

    pub fn num_sequences(&self) -> usize {
        self.sizes.len()
    }

    /// Flushes and fsyncs `.bin`, writes `.idx`, renames `.bin` then `.idx` into place. Sequences
    /// added after the last `end_document` are closed as one final document, so the document
    /// index always ends with the sequence count.
    pub fn finish(mut self) -> Result<()> {
        if *self.document_indices.last().expect("starts with 0") != self.sizes.len() as i64 {
            self.end_document();
        }
        let bin = self.bin.take().expect("IndexedWriter: open until finish");
        let file = bin
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("flushing {}", self.bin_tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("fsync of {}", self.bin_tmp.display()))?;
        drop(file);

        let n = self.sizes.len();
        let d = self.document_indices.len();
        let mut idx = Vec::with_capacity(HEADER_LEN + 12 * n + 8 * d);
        idx.extend_from_slice(INDEX_MAGIC);
        idx.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        idx.push(self.dtype.code());
        idx.extend_from_slice(&(n as u64).to_le_bytes());
        idx.extend_from_slice(&(d as u64).to_le_bytes());
        for &s in &self.sizes {
            idx.extend_from_slice(&s.to_le_bytes());
        }
        let mut pointer = 0i64;
        for &s in &self.sizes {
            idx.extend_from_slice(&pointer.to_le_bytes());
            pointer += s as i64 * self.dtype.size() as i64;
        }
        debug_assert_eq!(pointer as u64, self.bytes);
        for &x in &self.document_indices {
            idx.extend_from_slice(&x.to_le_bytes());
        }

        // Remove an older `.idx` first: between the two renames a new `.bin` must never sit
        // next to an old index that would describe it wrongly.
        match fs::remove_file(&self.idx_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing old {}", self.idx_path.display()));
            }
        }
        let idx_tmp = temp_name(&self.idx_path)?;
        let written = (|| -> Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&idx_tmp)
                .with_context(|| format!("creating {}", idx_tmp.display()))?;
            f.write_all(&idx)
                .with_context(|| format!("writing {}", idx_tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("fsync of {}", idx_tmp.display()))?;
            fs::rename(&self.bin_tmp, &self.bin_path).with_context(|| {
                format!(
                    "renaming {} to {}",
                    self.bin_tmp.display(),
                    self.bin_path.display()
                )
            })?;
            fs::rename(&idx_tmp, &self.idx_path).with_context(|| {
                format!(
                    "renaming {} to {}",
                    idx_tmp.display(),
                    self.idx_path.display()
                )
            })?;
            sync_dir(parent_dir(&self.idx_path))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&idx_tmp);
        }
        written
    }
}

impl Drop for IndexedWriter {
    fn drop(&mut self) {
        // Not finished, or finish failed before renaming `.bin`: the temporary file goes.
        drop(self.bin.take());
        if self.bin_tmp.exists() {
            let _ = fs::remove_file(&self.bin_tmp);
        }
    }
}

/// A Megatron indexed dataset opened for reading: the index in memory, `.bin` read at offsets.
#[derive(Debug)]
pub struct IndexedDataset {
    bin_path: PathBuf,
    bin: File,
    dtype: TokenDType,
    sizes: Vec<i32>,
    pointers: Vec<i64>,
    document_indices: Vec<i64>,
    total_tokens: u64,
}

/// Little-endian fixed-width values from a byte slice whose length the caller has checked.
fn le_vec<T, const N: usize>(bytes: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks_exact gives N bytes")))
        .collect()
}

impl IndexedDataset {
    /// Opens `<prefix>.idx` and `<prefix>.bin` and checks that they agree: magic, version, a
    /// supported dtype, an index as long as its counts say, contiguous pointers, a consistent
    /// document index, and a `.bin` exactly as long as the sequences it holds.
    pub fn open(prefix: &Path) -> Result<Self> {
        let idx_path = with_suffix(prefix, ".idx");
        let bin_path = with_suffix(prefix, ".bin");
        let idx = fs::read(&idx_path).with_context(|| format!("reading {}", idx_path.display()))?;
        let ip = idx_path.display();
        ensure!(
            idx.len() >= HEADER_LEN,
            "{ip}: truncated index: {} bytes, shorter than the {HEADER_LEN}-byte header",
            idx.len()
        );
        ensure!(
            &idx[..9] == INDEX_MAGIC,
            "{ip}: bad magic {:?}, expected {:?} (not a Megatron MMIDIDX index)",
            String::from_utf8_lossy(&idx[..9]),
            String::from_utf8_lossy(INDEX_MAGIC)
        );
        let version = u64::from_le_bytes(idx[9..17].try_into().expect("8 bytes"));
        ensure!(
            version == INDEX_VERSION,
            "{ip}: unsupported version {version}, expected {INDEX_VERSION}"
        );
        let code = idx[17];
        let dtype = TokenDType::from_code(code).with_context(|| {
            format!(
                "{ip}: unsupported dtype code {code}; expected 1 (uint8), 4 (int32) or 8 (uint16)"
            )
        })?;
        let n = u64::from_le_bytes(idx[18..26].try_into().expect("8 bytes"));
        let d = u64::from_le_bytes(idx[26..34].try_into().expect("8 bytes"));
        // Checked arithmetic: corrupt counts must give an error, not an overflow.
        let expected = n
            .checked_mul(12)
            .and_then(|x| d.checked_mul(8).and_then(|y| x.checked_add(y)))
            .and_then(|x| x.checked_add(HEADER_LEN as u64))
            .with_context(|| format!("{ip}: corrupt counts: {n} sequences, {d} documents"))?;
        let len = idx.len() as u64;
        ensure!(
            len >= expected,
            "{ip}: truncated index: {len} bytes, but {n} sequences and {d} documents need {expected}"
        );
        // Megatron's multimodal indices append one int8 mode per sequence.
        ensure!(
            len == expected || len == expected + n,
            "{ip}: {} unexpected trailing bytes after the index of {n} sequences and {d} documents",
            len - expected
        );
        let (n, d) = (n as usize, d as usize);
        let mut at = HEADER_LEN;
        let sizes = le_vec(&idx[at..at + 4 * n], i32::from_le_bytes);
        at += 4 * n;
        let pointers = le_vec(&idx[at..at + 8 * n], i64::from_le_bytes);
        at += 8 * n;
        let document_indices = le_vec(&idx[at..at + 8 * d], i64::from_le_bytes);

        let mut next = 0i64;
        for (i, (&s, &p)) in sizes.iter().zip(&pointers).enumerate() {
            ensure!(s >= 0, "{ip}: sequence {i} has negative size {s}");
            ensure!(
                p == next,
                "{ip}: sequence {i} starts at byte {p} of the .bin, expected {next} \
                 (sequences are stored back to back)"
            );
            next += s as i64 * dtype.size() as i64;
        }
        if let Some(&first) = document_indices.first() {
            ensure!(
                first == 0,
                "{ip}: document index starts with {first}, expected 0"
            );
        }
        for (k, w) in document_indices.windows(2).enumerate() {
            ensure!(
                w[0] <= w[1] && w[1] <= n as i64,
                "{ip}: document index entry {} is {} after {}: expected non-decreasing values \
                 up to the sequence count {n}",
                k + 1,
                w[1],
                w[0]
            );
        }

        let bin =
            File::open(&bin_path).with_context(|| format!("opening {}", bin_path.display()))?;
        let bin_len = bin
            .metadata()
            .with_context(|| format!("reading the size of {}", bin_path.display()))?
            .len();
        ensure!(
            bin_len == next as u64,
            "{}: {bin_len} bytes, but the index {ip} describes {n} sequences of {} \
             ({next} bytes)",
            bin_path.display(),
            dtype.name()
        );
        let total_tokens = sizes.iter().map(|&s| s as u64).sum();
        Ok(Self {
            bin_path,
            bin,
            dtype,
            sizes,
            pointers,
            document_indices,
            total_tokens,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    pub fn dtype(&self) -> TokenDType {
        self.dtype
    }

    /// Tokens per sequence.
    pub fn sizes(&self) -> &[i32] {
        &self.sizes
    }

    /// `[0, ..., len()]`: the sequence index where each document ends.
    pub fn document_indices(&self) -> &[i64] {
        &self.document_indices
    }

    /// Sequence `i`, whole.
    pub fn get(&self, i: usize) -> Result<Vec<u32>> {
        let size = self.size_of(i)?;
        self.read_range(i, 0, size)
    }

    /// Tokens `offset..offset + len` of sequence `i`.
    pub fn read_range(&self, i: usize, offset: usize, len: usize) -> Result<Vec<u32>> {
        let size = self.size_of(i)?;
        ensure!(
            offset.checked_add(len).is_some_and(|end| end <= size),
            "{}: tokens {offset}..{} of sequence {i} requested, but it has {size}",
            self.bin_path.display(),
            offset.saturating_add(len)
        );
        let w = self.dtype.size();
        let mut bytes = vec![0u8; len * w];
        let start = self.pointers[i] as u64 + (offset * w) as u64;
        read_exact_at(&self.bin, &mut bytes, start).with_context(|| {
            format!(
                "reading {} bytes at offset {start} of {} (sequence {i})",
                bytes.len(),
                self.bin_path.display()
            )
        })?;
        Ok(match self.dtype {
            TokenDType::U8 => bytes.iter().map(|&b| b as u32).collect(),
            TokenDType::U16 => le_vec(&bytes, u16::from_le_bytes)
                .into_iter()
                .map(u32::from)
                .collect(),
            TokenDType::I32 => {
                let v = le_vec(&bytes, i32::from_le_bytes);
                if let Some(k) = v.iter().position(|&t| t < 0) {
                    bail!(
                        "{}: negative token {} at position {} of sequence {i}",
                        self.bin_path.display(),
                        v[k],
                        offset + k
                    );
                }
                v.into_iter().map(|t| t as u32).collect()
            }
        })
    }

    /// Sum of all sequence sizes.
    pub fn total_tokens(&self) -> u64 {
        self.total_tokens
    }

    fn size_of(&self, i: usize) -> Result<usize> {
        match self.sizes.get(i) {
            Some(&s) => Ok(s as usize),
            None => bail!(
                "{}: sequence {i} requested, but the dataset has {}",
                self.bin_path.display(),
                self.sizes.len()
            ),
        }
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    // A private handle, so concurrent readers do not share one cursor.
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Documents of sequences of distinct tokens, within `max`.
    fn sample_docs(max: u32) -> Vec<Vec<Vec<u32>>> {
        let mut t = 0u32;
        let mut next = || {
            t = (t * 7 + 3) % (max + 1);
            t
        };
        let lens: [&[usize]; 4] = [&[3, 5], &[1], &[4, 0, 2], &[7, 1, 1, 6]];
        lens.iter()
            .map(|doc| {
                doc.iter()
                    .map(|&l| (0..l).map(|_| next()).collect())
                    .collect()
            })
            .collect()
    }

    fn write(prefix: &Path, dtype: TokenDType, docs: &[Vec<Vec<u32>>]) {
        let mut w = IndexedWriter::create(prefix, dtype).unwrap();
        for doc in docs {
            for seq in doc {
                w.add_sequence(seq).unwrap();
            }
            w.end_document();
        }
        w.finish().unwrap();
    }

    /// An independent `.idx` parser, written from the format description, not from `open`.
    struct HandParsed {
        code: u8,
        sizes: Vec<i32>,
        pointers: Vec<i64>,
        docs: Vec<i64>,
    }

    fn hand_parse(bytes: &[u8]) -> HandParsed {
        let mut cur = std::io::Cursor::new(bytes);
        let mut take = |n: usize| {
            let p = cur.position() as usize;
            cur.set_position((p + n) as u64);
            bytes[p..p + n].to_vec()
        };
        assert_eq!(take(9), b"MMIDIDX\x00\x00".to_vec());
        let u64_at = |b: Vec<u8>| u64::from_le_bytes(b.try_into().unwrap());
        assert_eq!(u64_at(take(8)), 1);
        let code = take(1)[0];
        let n = u64_at(take(8)) as usize;
        let d = u64_at(take(8)) as usize;
        let sizes = (0..n)
            .map(|_| i32::from_le_bytes(take(4).try_into().unwrap()))
            .collect();
        let pointers = (0..n)
            .map(|_| i64::from_le_bytes(take(8).try_into().unwrap()))
            .collect();
        let docs = (0..d)
            .map(|_| i64::from_le_bytes(take(8).try_into().unwrap()))
            .collect();
        assert_eq!(cur.position() as usize, bytes.len(), "no trailing bytes");
        HandParsed {
            code,
            sizes,
            pointers,
            docs,
        }
    }

    #[test]
    fn independent_reader_agrees_with_writer() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("tok");
        let docs = sample_docs(200_000);
        write(&prefix, TokenDType::I32, &docs);
        let h = hand_parse(&fs::read(dir.path().join("tok.idx")).unwrap());
        let bin = fs::read(dir.path().join("tok.bin")).unwrap();
        assert_eq!(h.code, 4);
        let seqs: Vec<&Vec<u32>> = docs.iter().flatten().collect();
        assert_eq!(h.sizes.len(), seqs.len());
        // Megatron's builder: [0] then len(sizes) after each document.
        let mut expect_docs = vec![0i64];
        let mut count = 0;
        for d in &docs {
            count += d.len() as i64;
            expect_docs.push(count);
        }
        assert_eq!(h.docs, expect_docs);
        let mut ptr = 0i64;
        for (i, s) in seqs.iter().enumerate() {
            assert_eq!(h.sizes[i] as usize, s.len());
            assert_eq!(h.pointers[i], ptr);
            let p = ptr as usize;
            let got: Vec<u32> = bin[p..p + 4 * s.len()]
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as u32)
                .collect();
            assert_eq!(&got, *s);
            ptr += 4 * s.len() as i64;
        }
        assert_eq!(ptr as usize, bin.len());
    }

    #[test]
    fn round_trip_all_dtypes() {
        for (dtype, max) in [
            (TokenDType::I32, 128_255),
            (TokenDType::U8, 255),
            (TokenDType::U16, 65_535),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let prefix = dir.path().join("data");
            let mut docs = sample_docs(max);
            docs[0][0][0] = max; // the largest value survives
            write(&prefix, dtype, &docs);
            let ds = IndexedDataset::open(&prefix).unwrap();
            assert_eq!(ds.dtype(), dtype);
            assert_eq!(TokenDType::from_code(dtype.code()), Some(dtype));
            let seqs: Vec<&Vec<u32>> = docs.iter().flatten().collect();
            assert_eq!(ds.len(), seqs.len());
            assert!(!ds.is_empty());
            assert_eq!(ds.document_indices(), &[0, 2, 3, 6, 10]);
            let total: usize = seqs.iter().map(|s| s.len()).sum();
            assert_eq!(ds.total_tokens(), total as u64);
            for (i, s) in seqs.iter().enumerate() {
                assert_eq!(ds.sizes()[i] as usize, s.len());
                assert_eq!(&ds.get(i).unwrap(), *s, "{dtype:?} sequence {i}");
                if s.len() >= 3 {
                    assert_eq!(ds.read_range(i, 1, 2).unwrap(), s[1..3].to_vec());
                }
            }
            assert!(ds.get(seqs.len()).is_err());
            assert!(ds.read_range(0, 2, 2).is_err());
        }
    }

    #[test]
    fn empty_dataset_and_open_document() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("e");
        IndexedWriter::create(&prefix, TokenDType::I32)
            .unwrap()
            .finish()
            .unwrap();
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert!(ds.is_empty());
        assert_eq!(ds.document_indices(), &[0]);

        // Sequences after the last end_document are closed as a final document.
        let mut w = IndexedWriter::create(&prefix, TokenDType::U16).unwrap();
        w.add_sequence(&[1, 2]).unwrap();
        w.end_document();
        w.add_sequence(&[3]).unwrap();
        assert_eq!(w.num_sequences(), 2);
        w.finish().unwrap();
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert_eq!(ds.document_indices(), &[0, 1, 2]);
        assert_eq!(ds.get(1).unwrap(), vec![3]);
    }

    #[test]
    fn value_out_of_range_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        for (dtype, bad) in [
            (TokenDType::U8, 256),
            (TokenDType::U16, 65_536),
            (TokenDType::I32, 1 << 31),
        ] {
            let mut w = IndexedWriter::create(&dir.path().join("x"), dtype).unwrap();
            let err = w.add_sequence(&[1, bad]).unwrap_err().to_string();
            assert!(
                err.contains(&bad.to_string()) && err.contains("x.bin"),
                "{err}"
            );
            assert_eq!(w.num_sequences(), 0);
        }
    }

    fn assert_open_error(prefix: &Path, file: &str, what: &str) {
        let err = format!("{:#}", IndexedDataset::open(prefix).unwrap_err());
        assert!(err.contains(file), "error names {file}: {err}");
        assert!(err.contains(what), "error says {what}: {err}");
    }

    #[test]
    fn corrupted_files_give_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("c");
        let idx_path = dir.path().join("c.idx");
        let bin_path = dir.path().join("c.bin");
        write(&prefix, TokenDType::I32, &sample_docs(1000));
        let idx = fs::read(&idx_path).unwrap();
        let bin = fs::read(&bin_path).unwrap();

        let mut bad = idx.clone();
        bad[0] = b'X';
        fs::write(&idx_path, &bad).unwrap();
        assert_open_error(&prefix, "c.idx", "bad magic");

        let mut bad = idx.clone();
        bad[9] = 2;
        fs::write(&idx_path, &bad).unwrap();
        assert_open_error(&prefix, "c.idx", "version 2");

        let mut bad = idx.clone();
        bad[17] = 6; // float64
        fs::write(&idx_path, &bad).unwrap();
        assert_open_error(&prefix, "c.idx", "dtype code 6");

        fs::write(&idx_path, &idx[..idx.len() - 3]).unwrap();
        assert_open_error(&prefix, "c.idx", "truncated");
        fs::write(&idx_path, &idx[..20]).unwrap();
        assert_open_error(&prefix, "c.idx", "truncated");

        fs::write(&idx_path, &idx).unwrap();
        fs::write(&bin_path, &bin[..bin.len() - 4]).unwrap();
        assert_open_error(&prefix, "c.bin", "bytes");

        fs::write(&bin_path, &bin).unwrap();
        IndexedDataset::open(&prefix).unwrap();
        fs::remove_file(&bin_path).unwrap();
        assert_open_error(&prefix, "c.bin", "opening");
    }

    #[test]
    fn interrupted_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("part");
        {
            let mut w = IndexedWriter::create(&prefix, TokenDType::I32).unwrap();
            w.add_sequence(&[1, 2, 3]).unwrap();
            w.end_document();
            // dropped without finish
        }
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        assert!(IndexedDataset::open(&prefix).is_err());
    }

    /// Must match `fixture` in bench/check_megatron_indexed.py.
    fn megatron_fixture_docs(modulus: u32) -> Vec<Vec<Vec<u32>>> {
        (0..6u32)
            .map(|d| {
                (0..d % 3 + 1)
                    .map(|s| {
                        let n = (7 * d + 3 * s) % 11;
                        (0..n)
                            .map(|t| ((d * 1000 + s * 100 + t) * 997) % modulus)
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Writes the fixture bench/check_megatron_indexed.py reads with megatron-core:
    /// `ULTRALONG_INDEXED_FIXTURE=DIR cargo test --lib write_megatron_fixture -- --ignored`.
    #[test]
    #[ignore = "writes files for bench/check_megatron_indexed.py"]
    fn write_megatron_fixture() {
        let dir = PathBuf::from(std::env::var("ULTRALONG_INDEXED_FIXTURE").unwrap());
        fs::create_dir_all(&dir).unwrap();
        for (name, dtype, modulus) in [
            ("i32", TokenDType::I32, 128_256),
            ("u8", TokenDType::U8, 256),
            ("u16", TokenDType::U16, 65_536),
        ] {
            let prefix = dir.join(format!("ours_{name}"));
            write(&prefix, dtype, &megatron_fixture_docs(modulus));
            IndexedDataset::open(&prefix).unwrap();
        }
    }

    #[test]
    fn rewrite_replaces_a_finished_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("r");
        write(&prefix, TokenDType::I32, &sample_docs(50));
        write(&prefix, TokenDType::I32, &[vec![vec![9, 8, 7]]]);
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert_eq!(ds.len(), 1);
        assert_eq!(ds.get(0).unwrap(), vec![9, 8, 7]);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
