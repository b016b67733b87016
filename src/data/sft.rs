//! `prepare sft`: chat samples (a `messages` array per record, in any input format `prepare cpt`
//! reads: JSON Lines plain, .gz or .zst, or Parquet) rendered with the Llama-3.1 chat template
//! (`data::chat`), with a loss mask on the assistant turns, packed into rows of `max_len` tokens.
//!
//! Output (`<out>/`), all Megatron indexed datasets with one sequence per row and one document
//! per row:
//! - `tokens.{bin,idx}` (int32): rows of exactly `max_len` tokens, the tail padded with
//!   `<|eot_id|>`;
//! - `loss_mask.{bin,idx}` (uint8): 1 where the token is a trained target (assistant content
//!   and its closing `<|eot_id|>`), 0 on headers, system, user and padding; the loader predicts
//!   `ids[t + 1]` from position `t` and counts it iff `loss_mask[t + 1] == 1`;
//! - `sample_offsets.{bin,idx}` (int32): per row, the cumulative sample boundaries
//!   `[0, end_1, ..., end_k]` (`cu_seqlens` style; `end_k` is where padding starts), so a
//!   sample-masked attention stays possible;
//! - `tokenizer.json` (copied), `manifest.json` (inputs with sizes and sha256, tokenizer sha256,
//!   options, template, report).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::chat::{
    ChatTemplate, Encoded, Message, ROLES, SYSTEM_PREAMBLE, encode_chat, jinja_trim,
};
use super::indexed::{IndexedWriter, TokenDType};
use super::prepare::{Record, read_records};
use crate::io::{AtomicDir, sha256_file, write_atomic};

/// Why an input line is not a usable sample; each kind is counted in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Invalid {
    Utf8(String),
    Json(String),
    /// A Parquet row that could not be read.
    Unreadable(String),
    MissingMessages,
    BadMessage(usize),
    BadRole(usize, String),
    Empty(usize),
    NoAssistant,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Utf8(e) => write!(f, "invalid UTF-8 ({e})"),
            Invalid::Json(e) => write!(f, "malformed JSON ({e})"),
            Invalid::Unreadable(e) => write!(f, "unreadable row ({e})"),
            Invalid::MissingMessages => write!(f, "no `messages` array"),
            Invalid::BadMessage(i) => write!(
                f,
                "messages[{i}] is not an object with string `role` and `content`"
            ),
            Invalid::BadRole(i, r) => write!(
                f,
                "messages[{i}] has role {r:?}, expected one of system, user, assistant"
            ),
            Invalid::Empty(i) => write!(f, "messages[{i}] has empty content"),
            Invalid::NoAssistant => write!(f, "no assistant turn (nothing to train on)"),
        }
    }
}

/// A record of an input file, owned: records are parsed and encoded in parallel chunks.
enum Raw {
    Line(Vec<u8>),
    /// A Parquet row as JSON (a `messages` column of role/content structs becomes the array).
    Json(serde_json::Value),
    Unreadable(String),
}

impl Raw {
    fn of(r: Record<'_>) -> Self {
        match r {
            Record::Line(l) => Raw::Line(l.to_vec()),
            Record::Row(row) => Raw::Json(row_json(&row)),
            Record::Unreadable(e) => Raw::Unreadable(e),
        }
    }

    fn messages(&self) -> Result<Vec<Message>, Invalid> {
        match self {
            Raw::Line(l) => parse_sample(l),
            Raw::Json(v) => messages_of(v),
            Raw::Unreadable(e) => Err(Invalid::Unreadable(e.clone())),
        }
    }
}

/// A Parquet row as JSON: strings, numbers, booleans, nulls, lists and structs as themselves
/// (what a `messages` column holds); any other value (bytes, dates, maps) becomes null, which
/// `messages_of` then refuses as a bad message.
fn row_json(row: &parquet::record::Row) -> serde_json::Value {
    use parquet::record::Field;
    use serde_json::Value;
    fn field(f: &Field) -> Value {
        match f {
            Field::Str(s) => Value::String(s.clone()),
            Field::Bool(b) => Value::Bool(*b),
            Field::Byte(x) => (*x).into(),
            Field::Short(x) => (*x).into(),
            Field::Int(x) => (*x).into(),
            Field::Long(x) => (*x).into(),
            Field::UByte(x) => (*x).into(),
            Field::UShort(x) => (*x).into(),
            Field::UInt(x) => (*x).into(),
            Field::ULong(x) => (*x).into(),
            Field::Float(x) => (*x).into(),
            Field::Double(x) => (*x).into(),
            Field::Group(r) => row_json(r),
            Field::ListInternal(l) => Value::Array(l.elements().iter().map(field).collect()),
            _ => Value::Null,
        }
    }
    Value::Object(
        row.get_column_iter()
            .map(|(k, f)| (k.clone(), field(f)))
            .collect(),
    )
}

/// Parses one JSON Lines record of the `messages` format (`messages_of`).
fn parse_sample(line: &[u8]) -> Result<Vec<Message>, Invalid> {
    let text = std::str::from_utf8(line).map_err(|e| Invalid::Utf8(e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Invalid::Json(e.to_string()))?;
    messages_of(&v)
}

/// The `messages` of one record. Empty content (after the template's trim) is refused for user
/// and assistant turns; an empty system message is allowed.
fn messages_of(v: &serde_json::Value) -> Result<Vec<Message>, Invalid> {
    let arr = v
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or(Invalid::MissingMessages)?;
    if arr.is_empty() {
        return Err(Invalid::MissingMessages);
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let msg: Message = serde_json::from_value(m.clone()).map_err(|_| Invalid::BadMessage(i))?;
        if !ROLES.contains(&msg.role.as_str()) {
            return Err(Invalid::BadRole(i, msg.role));
        }
        if msg.role != "system" && jinja_trim(&msg.content).is_empty() {
            return Err(Invalid::Empty(i));
        }
        out.push(msg);
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err(Invalid::NoAssistant);
    }
    Ok(out)
}

/// One output row: exactly `max_len` tokens once padded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    tokens: Vec<u32>,
    mask: Vec<u8>,
    /// `[0, end_1, ..., end_k]`: the samples' boundaries in the row.
    offsets: Vec<u32>,
}

impl Row {
    fn new() -> Self {
        Self {
            tokens: Vec::new(),
            mask: Vec::new(),
            offsets: vec![0],
        }
    }
}

/// Greedy packing of consecutive samples into rows of exactly `max_len` tokens (`pack`), or one
/// sample per row; the tail of a row is `pad` with mask 0. Samples never cross rows.
struct Packer {
    max_len: usize,
    pad: u32,
    pack: bool,
    cur: Row,
}

impl Packer {
    fn new(max_len: usize, pad: u32, pack: bool) -> Self {
        Self {
            max_len,
            pad,
            pack,
            cur: Row::new(),
        }
    }

    /// Adds a sample (`ids.len() <= max_len`); returns the row it closed, if any.
    fn push(&mut self, ids: &[u32], mask: &[bool]) -> Option<Row> {
        debug_assert!(ids.len() <= self.max_len && ids.len() == mask.len());
        let closed = if !self.cur.tokens.is_empty()
            && (!self.pack || self.cur.tokens.len() + ids.len() > self.max_len)
        {
            self.take()
        } else {
            None
        };
        self.cur.tokens.extend_from_slice(ids);
        self.cur.mask.extend(mask.iter().map(|&m| u8::from(m)));
        self.cur.offsets.push(self.cur.tokens.len() as u32);
        closed
    }

    /// Pads and returns the row under construction, if it has any sample.
    fn take(&mut self) -> Option<Row> {
        if self.cur.tokens.is_empty() {
            return None;
        }
        let mut row = std::mem::replace(&mut self.cur, Row::new());
        row.tokens.resize(self.max_len, self.pad);
        row.mask.resize(self.max_len, 0);
        Some(row)
    }
}

/// Options of `prepare sft`.
#[derive(Clone, Debug, Serialize)]
pub struct SftOptions {
    /// Inputs, one `{"messages": [{"role", "content"}, ...]}` per record: JSON Lines (plain,
    /// .gz, .zst) or Parquet with a `messages` column.
    pub inputs: Vec<PathBuf>,
    /// A tokenizer.json, or a directory holding one.
    pub tokenizer: PathBuf,
    /// Row length; samples longer than this are dropped (and counted), never truncated.
    pub max_len: usize,
    pub out: PathBuf,
    /// Several consecutive samples per row (greedy), or one sample per row.
    pub pack: bool,
    /// Skip and count bad lines instead of stopping at the first.
    pub skip_invalid: bool,
    /// Recorded in the manifest. Rows keep the input order (the training loader shuffles rows
    /// per epoch with its own seed), so the output does not depend on it.
    pub seed: u64,
}

/// Counts of a `prepare sft` run (also in manifest.json).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SftReport {
    /// Records read: non-blank input lines and Parquet rows.
    pub samples_in: u64,
    pub samples_written: u64,
    pub dropped_too_long: u64,
    pub invalid_utf8: u64,
    pub invalid_json: u64,
    pub missing_messages: u64,
    /// A message that is not an object with string `role` and `content`.
    pub bad_message: u64,
    pub bad_role: u64,
    /// A user or assistant message with empty content (after the template's trim).
    pub empty: u64,
    pub no_assistant: u64,
    /// Rows written, each `max_len` tokens.
    pub sequences: u64,
    /// Sample tokens written (without padding).
    pub tokens: u64,
    pub padding_tokens: u64,
    /// Tokens with loss mask 1 (assistant contents and their `<|eot_id|>`).
    pub assistant_tokens: u64,
}

impl SftReport {
    fn count_invalid(&mut self, why: &Invalid) {
        *match why {
            Invalid::Utf8(_) => &mut self.invalid_utf8,
            Invalid::Json(_) | Invalid::Unreadable(_) => &mut self.invalid_json,
            Invalid::MissingMessages => &mut self.missing_messages,
            Invalid::BadMessage(_) => &mut self.bad_message,
            Invalid::BadRole(..) => &mut self.bad_role,
            Invalid::Empty(_) => &mut self.empty,
            Invalid::NoAssistant => &mut self.no_assistant,
        } += 1;
    }
}

impl std::fmt::Display for SftReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows: [(&str, u64); 14] = [
            ("samples in", self.samples_in),
            ("samples written", self.samples_written),
            ("dropped (too long)", self.dropped_too_long),
            ("invalid UTF-8", self.invalid_utf8),
            ("malformed JSON", self.invalid_json),
            ("no messages", self.missing_messages),
            ("bad message", self.bad_message),
            ("bad role", self.bad_role),
            ("empty content", self.empty),
            ("no assistant turn", self.no_assistant),
            ("sequences", self.sequences),
            ("tokens", self.tokens),
            ("padding tokens", self.padding_tokens),
            ("assistant tokens", self.assistant_tokens),
        ];
        for (name, n) in rows {
            writeln!(f, "{name:<20} {n:>14}")?;
        }
        Ok(())
    }
}

/// Lines parsed and tokenized in parallel per chunk, then packed in input order.
const LINES_PER_CHUNK: usize = 1024;

/// The three output datasets, written row by row.
struct SftWriters {
    tokens: IndexedWriter,
    loss_mask: IndexedWriter,
    sample_offsets: IndexedWriter,
}

impl SftWriters {
    fn create(dir: &Path) -> Result<Self> {
        Ok(Self {
            tokens: IndexedWriter::create(&dir.join("tokens"), TokenDType::I32)?,
            loss_mask: IndexedWriter::create(&dir.join("loss_mask"), TokenDType::U8)?,
            sample_offsets: IndexedWriter::create(&dir.join("sample_offsets"), TokenDType::I32)?,
        })
    }

    fn write(&mut self, row: &Row, report: &mut SftReport) -> Result<()> {
        let mask: Vec<u32> = row.mask.iter().map(|&m| u32::from(m)).collect();
        self.tokens.add_sequence(&row.tokens)?;
        self.tokens.end_document();
        self.loss_mask.add_sequence(&mask)?;
        self.loss_mask.end_document();
        self.sample_offsets.add_sequence(&row.offsets)?;
        self.sample_offsets.end_document();
        let real = *row.offsets.last().expect("starts with 0") as u64;
        report.sequences += 1;
        report.tokens += real;
        report.padding_tokens += row.tokens.len() as u64 - real;
        report.assistant_tokens += row.mask.iter().map(|&m| u64::from(m)).sum::<u64>();
        Ok(())
    }

    fn finish(self) -> Result<()> {
        self.tokens.finish()?;
        self.loss_mask.finish()?;
        self.sample_offsets.finish()
    }
}

/// What encoding a sample needs: the tokenizer, the template's ids, the options.
struct Encoder<'a> {
    tok: &'a Tokenizer,
    t: &'a ChatTemplate,
    o: &'a SftOptions,
}

/// Encodes one input file's samples (in any format `read_records` reads) and writes the rows they
/// complete.
fn encode_file(
    path: &Path,
    enc: &Encoder<'_>,
    packer: &mut Packer,
    writers: &mut SftWriters,
    report: &mut SftReport,
) -> Result<()> {
    let mut chunk: Vec<(String, Raw)> = Vec::with_capacity(LINES_PER_CHUNK);
    read_records(path, |at, rec| {
        chunk.push((at.to_string(), Raw::of(rec)));
        if chunk.len() == LINES_PER_CHUNK {
            encode_chunk(&mut chunk, enc, packer, writers, report)?;
        }
        Ok(())
    })?;
    encode_chunk(&mut chunk, enc, packer, writers, report)
}

/// Parses and tokenizes a chunk of records in parallel, then packs them in input order; empties
/// the chunk.
fn encode_chunk(
    chunk: &mut Vec<(String, Raw)>,
    enc: &Encoder<'_>,
    packer: &mut Packer,
    writers: &mut SftWriters,
    report: &mut SftReport,
) -> Result<()> {
    let encoded: Vec<Result<Result<Encoded, Invalid>>> = chunk
        .par_iter()
        .map(|(_, raw)| match raw.messages() {
            Ok(messages) => encode_chat(enc.tok, enc.t, &messages).map(Ok),
            Err(why) => Ok(Err(why)),
        })
        .collect();
    for ((at, _), sample) in chunk.iter().zip(encoded) {
        report.samples_in += 1;
        let sample = sample.with_context(|| at.clone())?;
        match sample {
            Err(why) if enc.o.skip_invalid => report.count_invalid(&why),
            Err(why) => bail!("{at}: {why} (--skip-invalid skips and counts such lines)"),
            Ok((ids, _)) if ids.len() > enc.o.max_len => report.dropped_too_long += 1,
            Ok((ids, mask)) => {
                report.samples_written += 1;
                if let Some(row) = packer.push(&ids, &mask) {
                    writers.write(&row, report)?;
                }
            }
        }
    }
    chunk.clear();
    Ok(())
}

/// `prepare sft`: reads the `messages` JSON Lines, renders and tokenizes each sample with the
/// Llama-3.1 chat template, drops (and counts) samples over `max_len`, packs rows and writes the
/// datasets described in the module comment. Everything is written under a temporary directory
/// and renamed to `<out>` at the end (`io::AtomicDir`), replacing an older output; the result is
/// deterministic.
pub fn prepare_sft(o: &SftOptions) -> Result<SftReport> {
    if o.max_len == 0 || o.max_len > i32::MAX as usize {
        bail!("max_len must be in 1..={}, got {}", i32::MAX, o.max_len);
    }
    if o.inputs.is_empty() {
        bail!("prepare sft: no input files");
    }
    let tokenizer_path = crate::data::prepare::tokenizer_file(&o.tokenizer);
    let tok = crate::data::prepare::load_tokenizer(&tokenizer_path)?;
    let template = ChatTemplate::from_tokenizer(&tok)
        .with_context(|| format!("tokenizer {}", tokenizer_path.display()))?;

    let dir = AtomicDir::create(&o.out)?;

    let mut report = SftReport::default();
    let mut writers = SftWriters::create(dir.tmp())?;
    let mut packer = Packer::new(o.max_len, template.eot, o.pack);
    let mut inputs = Vec::with_capacity(o.inputs.len());
    for path in &o.inputs {
        let enc = Encoder {
            tok: &tok,
            t: &template,
            o,
        };
        encode_file(path, &enc, &mut packer, &mut writers, &mut report)?;
        let bytes = fs::metadata(path)
            .with_context(|| format!("reading metadata of {}", path.display()))?
            .len();
        inputs.push(serde_json::json!({
            "path": path.display().to_string(),
            "bytes": bytes,
            "sha256": sha256_file(path)?,
        }));
    }
    if let Some(row) = packer.take() {
        writers.write(&row, &mut report)?;
    }
    writers.finish()?;

    let tokenizer_bytes = fs::read(&tokenizer_path)
        .with_context(|| format!("reading {}", tokenizer_path.display()))?;
    write_atomic(&dir.tmp().join("tokenizer.json"), &tokenizer_bytes)?;
    let manifest = serde_json::json!({
        "kind": "sft",
        "inputs": inputs,
        "tokenizer": {
            "path": tokenizer_path.display().to_string(),
            "sha256": sha256_file(&tokenizer_path)?,
        },
        "options": o,
        "template": {
            "name": "llama-3.1-instruct (HF chat_template, no tools)",
            "system_preamble": SYSTEM_PREAMBLE,
            "begin_of_text": template.begin_of_text,
            "start_header_id": template.start_header,
            "end_header_id": template.end_header,
            "eot_id": template.eot,
            "pad_id": template.eot,
        },
        "files": {
            "tokens": "tokens.{bin,idx}: int32, one row of max_len tokens per sequence and document",
            "loss_mask": "loss_mask.{bin,idx}: uint8, 1 where the token is a trained target",
            "sample_offsets": "sample_offsets.{bin,idx}: int32, per row [0, end_1, ..., end_k]",
        },
        "report": report,
    });
    let text = serde_json::to_string_pretty(&manifest).context("serializing manifest.json")?;
    write_atomic(
        &dir.tmp().join("manifest.json"),
        format!("{text}\n").as_bytes(),
    )?;
    dir.commit()?;
    print!("{report}");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chat::tests::{msg, test_tokenizer};

    #[test]
    fn bad_samples_are_classified() {
        let cases: [(&[u8], &str); 8] = [
            (b"{\"messages\": [", "malformed JSON"),
            (b"\xff{}", "invalid UTF-8"),
            (b"{\"text\": \"hi\"}", "no `messages`"),
            (b"{\"messages\": [1]}", "messages[0] is not an object"),
            (
                b"{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
                "role \"bot\"",
            ),
            (
                b"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \" \\n\"}]}",
                "messages[1] has empty content",
            ),
            (
                b"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
                "no assistant turn",
            ),
            (b"{\"messages\": []}", "no `messages`"),
        ];
        for (line, want) in cases {
            let err = parse_sample(line).unwrap_err().to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        let ok = parse_sample(
            br#"{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "id": 3}"#,
        )
        .unwrap();
        assert_eq!(ok.len(), 3);
    }

    #[test]
    fn packer_fills_rows_greedily_and_pads() {
        let mut p = Packer::new(8, 99, true);
        let s = |n: u32| {
            (
                (0..n).map(|i| 10 * n + i).collect::<Vec<_>>(),
                vec![true; n as usize],
            )
        };
        let mut rows = Vec::new();
        for n in [3, 4, 2, 8, 1] {
            let (ids, mask) = s(n);
            rows.extend(p.push(&ids, &mask));
        }
        rows.extend(p.take());
        let offsets: Vec<Vec<u32>> = rows.iter().map(|r| r.offsets.clone()).collect();
        assert_eq!(
            offsets,
            vec![vec![0, 3, 7], vec![0, 2], vec![0, 8], vec![0, 1]]
        );
        for r in &rows {
            assert_eq!(r.tokens.len(), 8);
            assert_eq!(r.mask.len(), 8);
            let end = *r.offsets.last().unwrap() as usize;
            assert!(r.tokens[end..].iter().all(|&x| x == 99));
            assert!(r.mask[..end].iter().all(|&m| m == 1));
            assert!(r.mask[end..].iter().all(|&m| m == 0));
        }
        assert_eq!(&rows[0].tokens[..7], &[30, 31, 32, 40, 41, 42, 43]);

        let mut p = Packer::new(8, 99, false);
        let mut rows = Vec::new();
        for n in [3, 4] {
            let (ids, mask) = s(n);
            rows.extend(p.push(&ids, &mask));
        }
        rows.extend(p.take());
        let offsets: Vec<Vec<u32>> = rows.iter().map(|r| r.offsets.clone()).collect();
        assert_eq!(offsets, vec![vec![0, 3], vec![0, 4]]);
    }

    /// The `prepare_sft` fixture: a tokenizer file and JSON Lines written to a temp dir.
    struct Fixture {
        dir: tempfile::TempDir,
        tok: Tokenizer,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let tok = test_tokenizer();
            tok.save(dir.path().join("tokenizer.json"), false).unwrap();
            Self { dir, tok }
        }

        fn input(&self, name: &str, lines: &[String]) -> PathBuf {
            let p = self.dir.path().join(name);
            fs::write(&p, lines.join("\n") + "\n").unwrap();
            p
        }

        fn options(&self, inputs: Vec<PathBuf>, max_len: usize, pack: bool) -> SftOptions {
            SftOptions {
                inputs,
                tokenizer: self.dir.path().to_path_buf(),
                max_len,
                out: self.dir.path().join("out"),
                pack,
                skip_invalid: false,
                seed: 1,
            }
        }
    }

    fn line(messages: &[Message]) -> String {
        serde_json::json!({ "messages": messages }).to_string()
    }

    /// Samples of varied lengths, 1 to 3 user/assistant turns each; every tenth one long.
    fn samples(n: usize) -> Vec<Vec<Message>> {
        (0..n)
            .map(|i| {
                let mut m = Vec::new();
                if i % 3 == 0 {
                    m.push(msg("system", "You answer the question."));
                }
                for k in 0..(1 + i % 3) {
                    m.push(msg("user", &format!("What is {i} plus {k}?")));
                    let repeat = if i % 10 == 9 { 80 } else { 1 + i % 4 };
                    m.push(msg(
                        "assistant",
                        &format!("It is {}.", i + k).repeat(repeat),
                    ));
                }
                m
            })
            .collect()
    }

    fn open(out: &Path, name: &str) -> IndexedDataset {
        IndexedDataset::open(&out.join(name)).unwrap()
    }

    fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn siblings(f: &Fixture) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(f.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            // The output and its temporary or set-aside copies (`io::AtomicDir`).
            .filter(|n| {
                ["out", ".tmp-out", ".old-out"]
                    .iter()
                    .any(|p| n.starts_with(p))
            })
            .collect();
        v.sort();
        v
    }

    use super::super::indexed::IndexedDataset;

    #[test]
    fn packed_rows_reproduce_the_samples_and_their_masks() {
        let f = Fixture::new();
        let t = ChatTemplate::from_tokenizer(&f.tok).unwrap();
        let all = samples(40);
        let encoded: Vec<_> = all
            .iter()
            .map(|m| encode_chat(&f.tok, &t, m).unwrap())
            .collect();
        // Every tenth sample too long; the others two or more to a row.
        let mut lens: Vec<usize> = encoded.iter().map(|(ids, _)| ids.len()).collect();
        lens.sort();
        let max_len = 2 * lens[lens.len() - 5];
        let long = encoded
            .iter()
            .filter(|(ids, _)| ids.len() > max_len)
            .count();
        assert!(
            long > 0 && long < all.len(),
            "{long} too long: tune the fixture"
        );
        let a = f.input(
            "a.jsonl",
            &all[..25].iter().map(|m| line(m)).collect::<Vec<_>>(),
        );
        let b = f.input(
            "b.jsonl",
            &all[25..].iter().map(|m| line(m)).collect::<Vec<_>>(),
        );
        for pack in [true, false] {
            let o = f.options(vec![a.clone(), b.clone()], max_len, pack);
            let report = prepare_sft(&o).unwrap();
            let kept: Vec<_> = encoded
                .iter()
                .filter(|(ids, _)| ids.len() <= max_len)
                .collect();
            assert_eq!(report.samples_in, 40);
            assert_eq!(report.dropped_too_long, long as u64);
            assert_eq!(report.samples_written, kept.len() as u64);

            let tokens = open(&o.out, "tokens");
            let mask = open(&o.out, "loss_mask");
            let offsets = open(&o.out, "sample_offsets");
            assert_eq!(tokens.len(), report.sequences as usize);
            assert_eq!(mask.len(), tokens.len());
            assert_eq!(offsets.len(), tokens.len());
            let docs: Vec<i64> = (0..=tokens.len() as i64).collect();
            assert_eq!(tokens.document_indices(), &docs[..]);
            assert!(tokens.sizes().iter().all(|&s| s as usize == max_len));
            assert!(mask.sizes().iter().all(|&s| s as usize == max_len));
            if !pack {
                assert_eq!(tokens.len(), kept.len());
            } else {
                assert!(tokens.len() < kept.len());
            }

            let mut got = Vec::new();
            let mut assistant = 0u64;
            for r in 0..tokens.len() {
                let (ids, m, off) = (
                    tokens.get(r).unwrap(),
                    mask.get(r).unwrap(),
                    offsets.get(r).unwrap(),
                );
                assert_eq!(off[0], 0);
                let end = *off.last().unwrap() as usize;
                for w in off.windows(2) {
                    let (s, e) = (w[0] as usize, w[1] as usize);
                    let bools: Vec<bool> = m[s..e].iter().map(|&x| x == 1).collect();
                    got.push((ids[s..e].to_vec(), bools));
                }
                assert!(ids[end..].iter().all(|&x| x == t.eot));
                assert!(m[end..].iter().all(|&x| x == 0));
                assistant += m.iter().map(|&x| x as u64).sum::<u64>();
                if pack && r + 1 < tokens.len() {
                    // Greedy: the next row's first sample did not fit here.
                    let next = offsets.get(r + 1).unwrap();
                    assert!(end + next[1] as usize > max_len);
                }
            }
            let want: Vec<_> = kept.iter().map(|s| (*s).clone()).collect();
            assert_eq!(got, want);
            assert_eq!(report.assistant_tokens, assistant);
            assert_eq!(
                report.tokens + report.padding_tokens,
                (max_len * tokens.len()) as u64
            );

            let manifest: serde_json::Value =
                serde_json::from_slice(&fs::read(o.out.join("manifest.json")).unwrap()).unwrap();
            assert_eq!(manifest["inputs"][0]["sha256"], sha256_file(&a).unwrap());
            assert_eq!(
                manifest["inputs"][1]["bytes"],
                fs::metadata(&b).unwrap().len()
            );
            assert_eq!(
                manifest["tokenizer"]["sha256"],
                sha256_file(&f.dir.path().join("tokenizer.json")).unwrap()
            );
            assert_eq!(manifest["options"]["pack"], pack);
            let r: SftReport = serde_json::from_value(manifest["report"].clone()).unwrap();
            assert_eq!(r, report);
            assert_eq!(siblings(&f), vec!["out".to_string()]);
        }
    }

    #[test]
    fn malformed_line_error_names_file_and_line() {
        let f = Fixture::new();
        let good = line(&samples(1)[0]);
        let cases: [(&str, &str); 4] = [
            ("{\"messages\": [", "malformed JSON"),
            ("{\"text\": \"x\"}", "no `messages`"),
            (
                "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}",
                "role \"tool\"",
            ),
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}",
                "no assistant turn",
            ),
        ];
        for (bad, what) in cases {
            let p = f.input("bad.jsonl", &[good.clone(), String::new(), bad.to_string()]);
            let err = prepare_sft(&f.options(vec![p], 512, true)).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.contains("bad.jsonl:3:"), "{msg}");
            assert!(msg.contains(what), "{msg}");
        }
        let p = f.dir.path().join("utf8.jsonl");
        fs::write(
            &p,
            [good.as_bytes(), b"\n{\"messages\": \"\xff\"}\n"].concat(),
        )
        .unwrap();
        let err = prepare_sft(&f.options(vec![p], 512, true)).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("utf8.jsonl:2:") && msg.contains("UTF-8"),
            "{msg}"
        );
        // Every failed run left nothing behind.
        assert!(siblings(&f).is_empty(), "{:?}", siblings(&f));
    }

    #[test]
    fn skip_invalid_counts_each_kind() {
        let f = Fixture::new();
        let good = samples(3).iter().map(|m| line(m)).collect::<Vec<_>>();
        let lines = vec![
            good[0].clone(),
            "{\"messages\": [".into(),
            "[1, 2]".into(),
            "{\"messages\": [{\"role\": 1, \"content\": \"x\"}]}".into(),
            "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}".into(),
            "{\"messages\": [{\"role\": \"user\", \"content\": \"\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}".into(),
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}".into(),
            good[1].clone(),
            "   ".into(),
            good[2].clone(),
        ];
        let p = f.input("mixed.jsonl", &lines);
        let q = f.dir.path().join("bytes.jsonl");
        fs::write(&q, b"\xc3\x28\n").unwrap();
        let mut o = f.options(vec![p, q], 512, true);
        o.skip_invalid = true;
        let r = prepare_sft(&o).unwrap();
        let want = SftReport {
            samples_in: 10,
            samples_written: 3,
            invalid_utf8: 1,
            invalid_json: 1,
            missing_messages: 1,
            bad_message: 1,
            bad_role: 1,
            empty: 1,
            no_assistant: 1,
            ..r.clone()
        };
        assert_eq!(r, want);
        assert_eq!(r.dropped_too_long, 0);
        assert_eq!(r.sequences, 1);
    }

    /// `samples` as a Parquet file with a `messages` column (list of role/content structs, the
    /// layout HF chat datasets use), in two row groups.
    fn write_parquet(path: &Path, samples: &[Vec<Message>]) {
        use parquet::data_type::{ByteArray, ByteArrayType};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use std::sync::Arc;
        let schema = parquet::schema::parser::parse_message_type(
            "message chat { REQUIRED GROUP messages (LIST) { REPEATED GROUP list { \
             REQUIRED GROUP element { REQUIRED BYTE_ARRAY role (UTF8); \
             REQUIRED BYTE_ARRAY content (UTF8); } } } }",
        )
        .unwrap();
        let file = fs::File::create(path).unwrap();
        let props = Arc::new(WriterProperties::builder().build());
        let mut w = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
        let half = samples.len() / 2;
        for group in [&samples[..half], &samples[half..]] {
            let mut rg = w.next_row_group().unwrap();
            let mut column = 0;
            while let Some(mut col) = rg.next_column().unwrap() {
                let (mut values, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
                for m in group {
                    for (i, msg) in m.iter().enumerate() {
                        let v = if column == 0 { &msg.role } else { &msg.content };
                        values.push(ByteArray::from(v.as_str()));
                        def.push(1);
                        rep.push(i16::from(i > 0));
                    }
                }
                col.typed::<ByteArrayType>()
                    .write_batch(&values, Some(&def), Some(&rep))
                    .unwrap();
                col.close().unwrap();
                column += 1;
            }
            rg.close().unwrap();
        }
        w.close().unwrap();
    }

    #[test]
    fn gz_zst_and_parquet_inputs_give_the_output_of_the_plain_file() {
        let f = Fixture::new();
        // More samples than one parallel chunk, so chunks meet across a boundary.
        let all = samples(LINES_PER_CHUNK + 100);
        let text = all.iter().map(|m| line(m)).collect::<Vec<_>>().join("\n") + "\n";
        let plain = f.dir.path().join("chat.jsonl");
        fs::write(&plain, &text).unwrap();
        let gz = f.dir.path().join("chat.jsonl.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut e, text.as_bytes()).unwrap();
        fs::write(&gz, e.finish().unwrap()).unwrap();
        let zst = f.dir.path().join("chat.jsonl.zst");
        fs::write(&zst, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        let pq = f.dir.path().join("chat.parquet");
        write_parquet(&pq, &all);
        let run = |input: &Path| {
            let mut o = f.options(vec![input.to_path_buf()], 256, true);
            o.out = f.dir.path().join(format!(
                "out-{}",
                input.file_name().unwrap().to_string_lossy()
            ));
            let report = prepare_sft(&o).unwrap();
            let data: Vec<_> = dir_bytes(&o.out)
                .into_iter()
                .filter(|(n, _)| n != "manifest.json")
                .collect();
            (report, data)
        };
        let want = run(&plain);
        assert_eq!(want.0.samples_in, all.len() as u64);
        assert!(want.0.samples_written > 0 && want.0.dropped_too_long > 0);
        for input in [&gz, &zst, &pq] {
            assert!(run(input) == want, "{} differs", input.display());
        }
    }

    #[test]
    fn rerun_replaces_the_output_byte_identically() {
        let f = Fixture::new();
        let p = f.input(
            "a.jsonl",
            &samples(30).iter().map(|m| line(m)).collect::<Vec<_>>(),
        );
        let o = f.options(vec![p.clone()], 256, true);
        prepare_sft(&o).unwrap();
        let first = dir_bytes(&o.out);
        let names: Vec<&str> = first.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "loss_mask.bin",
                "loss_mask.idx",
                "manifest.json",
                "sample_offsets.bin",
                "sample_offsets.idx",
                "tokenizer.json",
                "tokens.bin",
                "tokens.idx",
            ]
        );
        // A stray file in the old output must not survive the replacement.
        fs::write(o.out.join("stray"), b"x").unwrap();
        prepare_sft(&o).unwrap();
        assert_eq!(dir_bytes(&o.out), first);
        assert_eq!(siblings(&f), vec!["out".to_string()]);
    }

    #[test]
    fn interrupted_run_leaves_no_output() {
        let f = Fixture::new();
        let mut lines: Vec<String> = samples(60).iter().map(|m| line(m)).collect();
        let p = f.input("good.jsonl", &lines);
        lines.push("{\"messages\": [".into());
        let bad = f.input("bad.jsonl", &lines);
        // Fails after rows were written: no `out`, no temporary directory.
        let o = f.options(vec![bad.clone()], 128, true);
        assert!(prepare_sft(&o).is_err());
        assert!(siblings(&f).is_empty(), "{:?}", siblings(&f));
        // With a complete older output, a failed run leaves it as it was.
        let o = f.options(vec![p], 128, true);
        prepare_sft(&o).unwrap();
        let before = dir_bytes(&o.out);
        assert!(prepare_sft(&f.options(vec![bad], 128, true)).is_err());
        assert_eq!(dir_bytes(&o.out), before);
        assert_eq!(siblings(&f), vec!["out".to_string()]);
    }
}
