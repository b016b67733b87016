//! `prepare cpt`: the paper's stage-1 data. Documents from JSON Lines (plain, .gz, .zst) or Parquet are
//! tokenized in parallel batches, resampled per domain by length (RECIPE.md §2, after Fu et al. 2024:
//! short documents down-sampled, long ones up-sampled, domain shares kept), joined with a single
//! separator token (`<s>`) between documents, packed into sequences of exactly `seq_len` tokens
//! (documents cross sequence boundaries; no cross-document mask) and written as a Megatron indexed
//! dataset with a manifest and a resampling report.
//!
//! Memory is bounded by the tokenization buffer, not by the corpus: pass 1 streams the inputs and
//! writes every document's tokens to a temporary indexed file, keeping only (domain, length) per
//! document; pass 2 decides the copies; pass 3 streams the chosen documents from the temporary file
//! into the packed output. Everything is written under a temporary directory beside `<out>` and
//! renamed at the end (`io::AtomicDir`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokenizers::{AddedToken, Tokenizer};

use crate::data::indexed::{IndexedDataset, IndexedWriter, TokenDType};
use crate::io::{AtomicDir, sha256_file, write_atomic};
use crate::util::rng;

/// Where a document's domain comes from.
#[derive(Clone, Debug, Serialize)]
pub enum DomainSource {
    /// A field of each JSON object.
    Field(String),
    /// The name of the directory holding the input file.
    Directory,
    /// Every document in one domain.
    Single,
}

/// The length-based resampling rule: documents shorter than `short` tokens are kept at rate
/// `short_weight` relative to mid-length ones, those longer than `long` at `long_weight`; each
/// domain is then scaled to keep its share of the budget.
#[derive(Clone, Debug, Serialize)]
pub struct Resampling {
    pub short: usize,
    pub long: usize,
    pub short_weight: f64,
    pub long_weight: f64,
}

impl Default for Resampling {
    fn default() -> Self {
        // The paper gives the thresholds (4K, 8K) but not the ratios (docs/RECIPE.md §2): these
        // are our choice.
        Resampling {
            short: 4096,
            long: 8192,
            short_weight: 0.5,
            long_weight: 2.0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CptOptions {
    pub inputs: Vec<PathBuf>,
    /// A tokenizer.json, or a directory holding one.
    pub tokenizer: PathBuf,
    pub seq_len: usize,
    /// Target number of tokens after resampling (before packing drops the last partial sequence).
    pub token_budget: u64,
    pub out: PathBuf,
    pub text_field: String,
    pub domain: DomainSource,
    /// The separator between documents (a special token; added to the tokenizer when missing).
    pub separator: String,
    /// Join documents with nothing between them (the paper's "without separator" ablation).
    pub no_separator: bool,
    pub resampling: Resampling,
    pub seed: u64,
    /// Bytes of raw text tokenized per batch (the memory bound).
    pub buffer_bytes: usize,
    pub skip_invalid: bool,
}

/// Documents and tokens in and out for one (domain, length bucket).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct BucketStats {
    pub docs_in: u64,
    pub tokens_in: u64,
    pub docs_out: u64,
    pub tokens_out: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct InvalidCounts {
    pub malformed_json: u64,
    pub missing_text: u64,
    pub invalid_utf8: u64,
    pub empty_document: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CptReport {
    /// domain -> bucket ("short", "mid", "long") -> stats.
    pub buckets: BTreeMap<String, BTreeMap<String, BucketStats>>,
    pub documents_in: u64,
    pub tokens_in: u64,
    pub documents_out: u64,
    /// Resampled document tokens plus separators.
    pub tokens_out: u64,
    pub separators: u64,
    pub sequences: u64,
    pub tokens_packed: u64,
    /// Tokens of the last partial sequence, not written.
    pub tokens_dropped: u64,
    pub separator_id: u32,
    pub invalid: InvalidCounts,
    /// What the user should know about the output (printed with the table): buckets whose
    /// documents the budget repeats.
    pub warnings: Vec<String>,
}

impl InvalidCounts {
    pub fn total(&self) -> u64 {
        self.malformed_json + self.missing_text + self.invalid_utf8 + self.empty_document
    }
}

impl CptReport {
    /// The printed table: per domain and bucket, documents and tokens in and out.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<16} {:<6} {:>10} {:>14} {:>10} {:>14} {:>8}\n",
            "domain", "bucket", "docs in", "tokens in", "docs out", "tokens out", "x"
        );
        for (d, bs) in &self.buckets {
            for (b, st) in bs {
                let x = if st.tokens_in > 0 {
                    st.tokens_out as f64 / st.tokens_in as f64
                } else {
                    0.0
                };
                s += &format!(
                    "{:<16} {:<6} {:>10} {:>14} {:>10} {:>14} {:>8.3}\n",
                    d, b, st.docs_in, st.tokens_in, st.docs_out, st.tokens_out, x
                );
            }
        }
        s += &format!(
            "total: {} docs / {} tokens in; {} docs / {} tokens out (+{} separators); {} sequences, {} tokens dropped\n",
            self.documents_in,
            self.tokens_in,
            self.documents_out,
            self.tokens_out - self.separators,
            self.separators,
            self.sequences,
            self.tokens_dropped
        );
        let v = &self.invalid;
        if v.total() > 0 {
            s += &format!(
                "skipped {} input lines (--skip-invalid): {} malformed JSON, {} without the text \
                 field, {} invalid UTF-8, {} empty documents\n",
                v.total(),
                v.malformed_json,
                v.missing_text,
                v.invalid_utf8,
                v.empty_document
            );
        }
        for w in &self.warnings {
            s += &format!("warning: {w}\n");
        }
        s
    }

    /// A warning for each bucket whose documents come out more than once on average because the
    /// budget asks for more than the corpus holds: its rate (tokens out / in) exceeds both 1 and
    /// its weight (a long-document weight of 2 repeats long documents by design, not by budget).
    fn repeat_warnings(&self, r: &Resampling, budget: u64) -> Vec<String> {
        let weight = |b: &str| match b {
            "short" => r.short_weight,
            "long" => r.long_weight,
            _ => 1.0,
        };
        let mut out = vec![];
        for (d, bs) in &self.buckets {
            for (b, st) in bs {
                let rate = st.tokens_out as f64 / st.tokens_in.max(1) as f64;
                // 1% above: the error diffusion ends each bucket within half a document.
                if rate > 1.01 * weight(b).max(1.0) {
                    out.push(format!(
                        "domain {d:?}, {b} documents: each repeated {rate:.2}x on average to fill \
                         --tokens {budget} from {} input tokens; a larger corpus or a smaller \
                         --tokens avoids repeats",
                        self.tokens_in
                    ));
                }
            }
        }
        out
    }
}

pub const BUCKETS: [&str; 3] = ["short", "mid", "long"];

fn bucket_of(len: usize, r: &Resampling) -> usize {
    if len < r.short {
        0
    } else if len > r.long {
        2
    } else {
        1
    }
}

/// `p` itself, or `p/tokenizer.json` when `p` is a (model or dataset) directory.
pub fn tokenizer_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("tokenizer.json")
    } else {
        p.to_path_buf()
    }
}

/// Load a tokenizer from a file or a directory's tokenizer.json.
pub fn load_tokenizer(p: &Path) -> Result<Tokenizer> {
    let file = tokenizer_file(p);
    Tokenizer::from_file(&file)
        .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", file.display()))
}

/// How the separator got its id (recorded in the dataset manifest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeparatorSource {
    /// The tokenizer already had the token.
    Existing,
    /// An unused reserved special token of the tokenizer (Llama 3's
    /// `<|reserved_special_token_N|>`, here the named one) was renamed to the separator: its id is
    /// inside the model's embedding, and the vocabulary size does not change.
    Reserved(String),
    /// Appended as a new special token: the vocabulary grows by one, so the model's embedding
    /// must already have a row for it (training checks `vocab_size`).
    Added,
}

/// The number `N` of a Llama 3 reserved special token `<|reserved_special_token_N|>`.
fn reserved_number(content: &str) -> Option<u64> {
    content
        .strip_prefix("<|reserved_special_token_")?
        .strip_suffix("|>")?
        .parse()
        .ok()
}

/// The id of `sep`. A tokenizer without it gets it in the lowest-numbered reserved special
/// token's slot when it has reserved tokens (Llama 3: its 128,256 ids are all embedding rows, so a
/// new token would fall outside the embedding), else as a new special token.
pub fn ensure_separator(tok: &mut Tokenizer, sep: &str) -> Result<(u32, SeparatorSource)> {
    if let Some(id) = tok.token_to_id(sep) {
        return Ok((id, SeparatorSource::Existing));
    }
    let json = tok
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
    let mut v: serde_json::Value = serde_json::from_str(&json)?;
    let reserved = v["added_tokens"].as_array_mut().and_then(|list| {
        list.iter_mut()
            .filter(|t| t["special"].as_bool() == Some(true))
            .filter_map(|t| {
                let n = reserved_number(t["content"].as_str()?)?;
                Some((n, t))
            })
            .min_by_key(|(n, _)| *n)
            .map(|(_, t)| t)
    });
    if let Some(t) = reserved {
        let from = t["content"].as_str().unwrap_or_default().to_string();
        let id = t["id"]
            .as_u64()
            .with_context(|| format!("tokenizer: added token {from:?} has no id"))?
            as u32;
        t["content"] = serde_json::Value::String(sep.to_string());
        // Ids of added tokens are re-derived on loading (the model's own id when the model's
        // vocabulary has the token, else the next free one), so rename it there too.
        match &mut v["model"]["vocab"] {
            serde_json::Value::Object(map) => {
                if let Some(mid) = map.remove(&from) {
                    map.insert(sep.to_string(), mid);
                }
            }
            serde_json::Value::Array(pieces) => {
                for p in pieces.iter_mut() {
                    if p[0].as_str() == Some(from.as_str()) {
                        p[0] = serde_json::Value::String(sep.to_string());
                    }
                }
            }
            _ => {}
        }
        *tok = Tokenizer::from_str(&v.to_string())
            .map_err(|e| anyhow::anyhow!("cannot rebuild the tokenizer with {sep:?}: {e}"))?;
        if tok.token_to_id(sep) != Some(id) {
            bail!("renaming {from:?} (id {id}) to the separator {sep:?} did not take effect");
        }
        return Ok((id, SeparatorSource::Reserved(from)));
    }
    tok.add_special_tokens(vec![AddedToken::from(sep.to_string(), true)])
        .map_err(|e| anyhow::anyhow!("cannot add separator {sep:?} to the tokenizer: {e}"))?;
    let id = tok
        .token_to_id(sep)
        .with_context(|| format!("could not add separator token {sep:?}"))?;
    Ok((id, SeparatorSource::Added))
}

/// Next to the separator-carrying `tokenizer.json` in `dst`, the other tokenizer files found
/// beside the input tokenizer.json in `src` (the model directory), with `tokenizer_config.json`'s
/// `added_tokens_decoder` entry for `sep_id` renamed to `sep` — transformers rebuilds special
/// tokens from that table, so it must agree with tokenizer.json.
fn write_tokenizer_companions(src: &Path, dst: &Path, sep_id: u32, sep: &str) -> Result<()> {
    if !src.as_os_str().is_empty() && !src.is_dir() {
        return Ok(());
    }
    for name in crate::io::TOKENIZER_FILES {
        let from = src.join(name);
        if name == "tokenizer.json" || !from.is_file() {
            continue;
        }
        let bytes =
            std::fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
        let bytes = if name == "tokenizer_config.json" {
            let mut v: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not JSON", from.display()))?;
            if let Some(e) = v
                .get_mut("added_tokens_decoder")
                .and_then(|d| d.get_mut(sep_id.to_string()))
            {
                e["content"] = serde_json::Value::String(sep.to_string());
            }
            serde_json::to_vec_pretty(&v)?
        } else {
            bytes
        };
        write_atomic(&dst.join(name), &bytes)?;
    }
    Ok(())
}

/// Open an input, decompressing `.gz` and `.zst` by extension.
fn open_input(p: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(p).with_context(|| format!("cannot open input {}", p.display()))?;
    let name = p.to_string_lossy();
    let r: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else if name.ends_with(".zst") || name.ends_with(".zstd") {
        Box::new(
            zstd::stream::read::Decoder::new(f)
                .with_context(|| format!("{}: not a zstd stream", p.display()))?,
        )
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 20, r)))
}

/// One raw document waiting for tokenization.
struct Pending {
    text: String,
    domain: u32,
}

/// Pass 1 state: the temporary per-document token file and what we keep per document.
struct Pass1 {
    docs: IndexedWriter,
    domain_of: Vec<u32>,
    len_of: Vec<u32>,
    domains: Vec<String>,
    pending: Vec<Pending>,
    pending_bytes: usize,
}

impl Pass1 {
    fn domain_id(&mut self, name: &str) -> u32 {
        if let Some(i) = self.domains.iter().position(|d| d == name) {
            return i as u32;
        }
        self.domains.push(name.to_string());
        (self.domains.len() - 1) as u32
    }

    /// Tokenize the pending documents in parallel (tokenizers' batch API) and append them.
    fn flush(
        &mut self,
        tok: &Tokenizer,
        invalid: &mut InvalidCounts,
        skip_invalid: bool,
    ) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let texts: Vec<&str> = batch.iter().map(|p| p.text.as_str()).collect();
        let enc = tok
            .encode_batch(texts, false)
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        for (p, e) in batch.iter().zip(enc) {
            let ids = e.get_ids();
            if ids.is_empty() {
                if !skip_invalid {
                    bail!(
                        "a document tokenizes to no tokens (use --skip-invalid to drop such documents)"
                    );
                }
                invalid.empty_document += 1;
                continue;
            }
            self.docs.add_sequence(ids)?;
            self.docs.end_document();
            self.domain_of.push(p.domain);
            self.len_of.push(ids.len() as u32);
        }
        Ok(())
    }
}

/// One record of an input file (see `read_records`).
pub(crate) enum Record<'a> {
    /// A non-blank line of JSON Lines, not yet parsed.
    Line(&'a [u8]),
    /// A Parquet row.
    Row(parquet::record::Row),
    /// A Parquet row that could not be read, and why.
    Unreadable(String),
}

/// Every record of `input`, in order, to `each` with where it is (`file:line`, or `file: row
/// group g, row r`): a `.parquet` file row by row (the format of HF datasets), anything else as
/// JSON Lines, decompressed by extension (`.gz`, `.zst`). Errors of the file itself (open, read,
/// format) name it; `each` judges the records.
pub(crate) fn read_records(
    input: &Path,
    mut each: impl FnMut(&str, Record<'_>) -> Result<()>,
) -> Result<()> {
    if input.extension().is_some_and(|e| e == "parquet") {
        return read_parquet(input, each);
    }
    let mut r = open_input(input)?;
    let mut line = Vec::new();
    let mut lineno = 0u64;
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .with_context(|| format!("{}: read error after line {lineno}", input.display()))?;
        if n == 0 {
            return Ok(());
        }
        lineno += 1;
        let trimmed = line.trim_ascii();
        if !trimmed.is_empty() {
            each(
                &format!("{}:{lineno}", input.display()),
                Record::Line(trimmed),
            )?;
        }
    }
}

/// A Parquet file's rows, row group by row group (`read_records`).
fn read_parquet(input: &Path, mut each: impl FnMut(&str, Record<'_>) -> Result<()>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(input)
        .with_context(|| format!("cannot open input {}", input.display()))?;
    let reader = SerializedFileReader::new(f)
        .with_context(|| format!("{}: not a readable Parquet file", input.display()))?;
    for g in 0..reader.metadata().num_row_groups() {
        let group = reader
            .get_row_group(g)
            .with_context(|| format!("{}: cannot read row group {g}", input.display()))?;
        let rows = group
            .get_row_iter(None)
            .with_context(|| format!("{}: cannot read rows of row group {g}", input.display()))?;
        for (r, row) in rows.enumerate() {
            let at = format!("{}: row group {g}, row {r}", input.display());
            match row {
                Ok(row) => each(&at, Record::Row(row))?,
                Err(e) => each(&at, Record::Unreadable(e.to_string()))?,
            }
        }
    }
    Ok(())
}

/// Read every input into pass 1, checking each record.
fn read_inputs(
    o: &CptOptions,
    tok: &Tokenizer,
    p1: &mut Pass1,
    invalid: &mut InvalidCounts,
) -> Result<()> {
    for input in &o.inputs {
        let dir_domain = input
            .parent()
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".into());
        let domain_key = match &o.domain {
            DomainSource::Field(f) => Some(f.as_str()),
            _ => None,
        };
        read_records(input, |at, rec| match rec {
            Record::Line(line) => {
                let text = match std::str::from_utf8(line) {
                    Ok(t) => t,
                    Err(e) => {
                        if o.skip_invalid {
                            invalid.invalid_utf8 += 1;
                            return Ok(());
                        }
                        bail!("{at}: invalid UTF-8 ({e})");
                    }
                };
                let v: serde_json::Value = match serde_json::from_str(text) {
                    Ok(v) => v,
                    Err(e) => {
                        if o.skip_invalid {
                            invalid.malformed_json += 1;
                            return Ok(());
                        }
                        bail!("{at}: malformed JSON: {e}");
                    }
                };
                let field = |k: Option<&str>| k.and_then(|k| v.get(k)).and_then(|x| x.as_str());
                let (text, domain) = (field(Some(&o.text_field)), field(domain_key));
                accept_document(o, tok, p1, invalid, text, domain, &dir_domain, at)
            }
            Record::Row(row) => {
                let (mut text, mut domain) = (None, None);
                for (name, field) in row.get_column_iter() {
                    if let parquet::record::Field::Str(s) = field {
                        if name == &o.text_field {
                            text = Some(s.as_str());
                        } else if Some(name.as_str()) == domain_key {
                            domain = Some(s.as_str());
                        }
                    }
                }
                accept_document(o, tok, p1, invalid, text, domain, &dir_domain, at)
            }
            Record::Unreadable(e) => {
                if o.skip_invalid {
                    invalid.malformed_json += 1;
                    return Ok(());
                }
                bail!("{at}: unreadable row: {e}");
            }
        })?;
    }
    p1.flush(tok, invalid, o.skip_invalid)
}

/// Check one document (text and domain as found at `at`) and queue it for tokenization.
#[allow(clippy::too_many_arguments)]
fn accept_document(
    o: &CptOptions,
    tok: &Tokenizer,
    p1: &mut Pass1,
    invalid: &mut InvalidCounts,
    text: Option<&str>,
    domain_field: Option<&str>,
    dir_domain: &str,
    at: &str,
) -> Result<()> {
    let Some(doc) = text else {
        if o.skip_invalid {
            invalid.missing_text += 1;
            return Ok(());
        }
        bail!("{at}: no string field {:?}", o.text_field);
    };
    if doc.trim().is_empty() {
        if o.skip_invalid {
            invalid.empty_document += 1;
            return Ok(());
        }
        bail!("{at}: empty document in field {:?}", o.text_field);
    }
    let domain = match &o.domain {
        DomainSource::Field(f) => match domain_field {
            Some(d) => d.to_string(),
            None => {
                if o.skip_invalid {
                    invalid.missing_text += 1;
                    return Ok(());
                }
                bail!("{at}: no string domain field {f:?}");
            }
        },
        DomainSource::Directory => dir_domain.to_string(),
        DomainSource::Single => "default".into(),
    };
    let domain = p1.domain_id(&domain);
    p1.pending_bytes += doc.len();
    p1.pending.push(Pending {
        text: doc.to_string(),
        domain,
    });
    if p1.pending_bytes >= o.buffer_bytes {
        p1.flush(tok, invalid, o.skip_invalid)
            .with_context(|| format!("{at}: in the batch ending here"))?;
    }
    Ok(())
}

/// Copies of each document: per (domain, bucket) a rate `k_domain × weight_bucket`, with `k` set so
/// each domain gets its share of the budget. Each document costs its length plus its separator.
/// Copies are assigned over the bucket's documents in a seeded random order by error diffusion on
/// tokens: each document gets `round(deficit / cost)` copies, where the deficit is the bucket's
/// target so far (Σ rate·cost) minus what it already received, so every bucket ends within half a
/// document of its target and each document's expected copies are its rate.
pub fn resample_copies(
    domain_of: &[u32],
    len_of: &[u32],
    n_domains: usize,
    r: &Resampling,
    budget: u64,
    sep_per_doc: bool,
    seed: u64,
) -> Vec<u32> {
    let n = domain_of.len();
    let weight = [r.short_weight, 1.0, r.long_weight];
    let cost = |i: usize| len_of[i] as f64 + if sep_per_doc { 1.0 } else { 0.0 };
    let mut cost_in = vec![[0f64; 3]; n_domains];
    for i in 0..n {
        cost_in[domain_of[i] as usize][bucket_of(len_of[i] as usize, r)] += cost(i);
    }
    let total: f64 = cost_in.iter().flatten().sum();
    let mut rate = vec![[0f64; 3]; n_domains];
    for d in 0..n_domains {
        let share = cost_in[d].iter().sum::<f64>() / total.max(1.0);
        let weighted: f64 = (0..3).map(|b| weight[b] * cost_in[d][b]).sum();
        let k = if weighted > 0.0 {
            budget as f64 * share / weighted
        } else {
            0.0
        };
        for b in 0..3 {
            rate[d][b] = k * weight[b];
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| rng::mix64(seed ^ rng::mix64(i as u64 + 1)));
    let mut target = vec![[0f64; 3]; n_domains];
    let mut given = vec![[0f64; 3]; n_domains];
    let mut copies = vec![0u32; n];
    for i in order {
        let (d, b) = (domain_of[i] as usize, bucket_of(len_of[i] as usize, r));
        target[d][b] += rate[d][b] * cost(i);
        let c = ((target[d][b] - given[d][b]) / cost(i)).round().max(0.0);
        copies[i] = c as u32;
        given[d][b] += c * cost(i);
    }
    copies
}

fn stats_report(
    report: &mut CptReport,
    domains: &[String],
    domain_of: &[u32],
    len_of: &[u32],
    copies: &[u32],
    r: &Resampling,
) {
    for (i, (&d, &l)) in domain_of.iter().zip(len_of).enumerate() {
        let st = report
            .buckets
            .entry(domains[d as usize].clone())
            .or_default()
            .entry(BUCKETS[bucket_of(l as usize, r)].to_string())
            .or_default();
        st.docs_in += 1;
        st.tokens_in += l as u64;
        st.docs_out += copies[i] as u64;
        st.tokens_out += copies[i] as u64 * l as u64;
    }
}

#[derive(Serialize)]
struct InputRecord {
    path: String,
    bytes: u64,
    sha256: String,
}

/// Run `prepare cpt`; returns the report (also written to `<out>/report.json` and the manifest).
pub fn prepare_cpt(o: &CptOptions) -> Result<CptReport> {
    if o.seq_len < 2 {
        bail!("--seq-len must be at least 2 (got {})", o.seq_len);
    }
    if o.inputs.is_empty() {
        bail!("no --input given");
    }
    let mut tok = load_tokenizer(&o.tokenizer)?;
    let (sep_id, sep_source) = ensure_separator(&mut tok, &o.separator)?;
    let vocab = tok.get_vocab_size(true);
    match &sep_source {
        SeparatorSource::Existing => {}
        SeparatorSource::Reserved(from) => eprintln!(
            "separator {:?} takes the reserved special token {from} (id {sep_id}); the vocabulary stays {vocab}",
            o.separator
        ),
        SeparatorSource::Added => eprintln!(
            "added separator {:?} to the tokenizer as special token {sep_id} (vocabulary now {vocab})",
            o.separator
        ),
    }
    let dir = AtomicDir::create(&o.out)?;
    std::fs::create_dir_all(dir.tmp().join("stage"))
        .with_context(|| format!("cannot create {}", dir.tmp().join("stage").display()))?;
    let report = prepare_into(o, &mut tok, (sep_id, &sep_source), vocab, dir.tmp())?;
    dir.commit()?;
    Ok(report)
}

fn prepare_into(
    o: &CptOptions,
    tok: &mut Tokenizer,
    (sep_id, sep_source): (u32, &SeparatorSource),
    vocab: usize,
    tmp: &Path,
) -> Result<CptReport> {
    let dtype = TokenDType::I32;
    let mut report = CptReport {
        separator_id: sep_id,
        ..Default::default()
    };
    // Pass 1: tokenize into a temporary per-document file.
    let stage = tmp.join("stage/docs");
    let mut p1 = Pass1 {
        docs: IndexedWriter::create(&stage, dtype)?,
        domain_of: vec![],
        len_of: vec![],
        domains: vec![],
        pending: vec![],
        pending_bytes: 0,
    };
    let mut invalid = InvalidCounts::default();
    read_inputs(o, tok, &mut p1, &mut invalid)?;
    let Pass1 {
        docs,
        domain_of,
        len_of,
        domains,
        ..
    } = p1;
    docs.finish()?;
    report.invalid = invalid;
    report.documents_in = domain_of.len() as u64;
    report.tokens_in = len_of.iter().map(|&l| l as u64).sum();
    if domain_of.is_empty() {
        bail!("the inputs hold no documents");
    }

    // Pass 2: copies per document, then a seeded shuffle of all copies.
    let copies = resample_copies(
        &domain_of,
        &len_of,
        domains.len(),
        &o.resampling,
        o.token_budget,
        true,
        o.seed,
    );
    stats_report(
        &mut report,
        &domains,
        &domain_of,
        &len_of,
        &copies,
        &o.resampling,
    );
    let mut order: Vec<u32> = Vec::with_capacity(copies.iter().map(|&c| c as usize).sum());
    for (i, &c) in copies.iter().enumerate() {
        order.extend(std::iter::repeat_n(i as u32, c as usize));
    }
    for i in (1..order.len()).rev() {
        let j = (rng::uniform(o.seed, 0x5eed_d0c5, i as u64) * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }

    // Pass 3: join with separators and pack into sequences of exactly seq_len tokens.
    let src = IndexedDataset::open(&stage)?;
    let mut out = IndexedWriter::create(&tmp.join("tokens"), dtype)?;
    let mut doc_starts: Vec<u64> = Vec::with_capacity(order.len());
    let mut buf: Vec<u32> = Vec::with_capacity(2 * o.seq_len);
    let mut emitted = 0u64;
    for (k, &doc) in order.iter().enumerate() {
        if k > 0 && !o.no_separator {
            buf.push(sep_id);
            report.separators += 1;
        }
        doc_starts.push(emitted + buf.len() as u64);
        buf.extend(src.get(doc as usize)?);
        while buf.len() >= o.seq_len {
            out.add_sequence(&buf[..o.seq_len])?;
            out.end_document();
            buf.drain(..o.seq_len);
            emitted += o.seq_len as u64;
        }
    }
    report.documents_out = order.len() as u64;
    report.tokens_out = report
        .buckets
        .values()
        .flat_map(|b| b.values())
        .map(|s| s.tokens_out)
        .sum::<u64>()
        + report.separators;
    report.tokens_dropped = buf.len() as u64;
    report.warnings = report.repeat_warnings(&o.resampling, o.token_budget);
    report.sequences = out.num_sequences() as u64;
    report.tokens_packed = emitted;
    if report.sequences == 0 {
        bail!(
            "the resampled corpus ({} tokens) is shorter than one sequence of {}",
            report.tokens_out,
            o.seq_len
        );
    }
    out.finish()?;
    drop(src);
    std::fs::remove_dir_all(tmp.join("stage")).context("cannot remove the staging files")?;
    // Document starts (global token offsets), for a document-masked ablation: u64 little-endian.
    let bytes: Vec<u8> = doc_starts.iter().flat_map(|s| s.to_le_bytes()).collect();
    write_atomic(&tmp.join("doc_starts.u64"), &bytes)?;
    tok.save(tmp.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot save tokenizer: {e}"))?;
    let tok_home = tokenizer_file(&o.tokenizer)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    write_tokenizer_companions(&tok_home, tmp, sep_id, &o.separator)?;

    let inputs: Vec<InputRecord> = o
        .inputs
        .iter()
        .map(|p| {
            Ok(InputRecord {
                path: p.display().to_string(),
                bytes: std::fs::metadata(p)?.len(),
                sha256: sha256_file(p)?,
            })
        })
        .collect::<Result<_>>()?;
    let manifest = serde_json::json!({
        "kind": "cpt",
        "format": "megatron indexed dataset (MMIDIDX v1), tokens.bin/.idx, int32, one sequence of seq_len tokens per entry",
        "seq_len": o.seq_len,
        "vocab_size": vocab,
        "separator": if o.no_separator { None } else { Some(&o.separator) },
        "separator_id": sep_id,
        "separator_source": sep_source,
        "doc_starts": "doc_starts.u64: u64 little-endian global token offset of each document's first token",
        "inputs": inputs,
        "tokenizer_sha256": sha256_file(&tmp.join("tokenizer.json"))?,
        "options": o,
        "report": &report,
    });
    write_atomic(
        &tmp.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomic(
        &tmp.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{}", report.table());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic corpus: two domains of very different sizes, lengths spread over all buckets.
    fn corpus() -> (Vec<u32>, Vec<u32>) {
        let (mut dom, mut len) = (vec![], vec![]);
        for i in 0..4000u64 {
            let d = if i % 4 == 0 { 1 } else { 0 };
            let l = 200 + (rng::uniform(1, 2, i) * 16000.0) as u32;
            dom.push(d);
            len.push(l);
        }
        (dom, len)
    }

    #[test]
    fn resampling_hits_budget_shares_and_bucket_rates() {
        let (dom, len) = corpus();
        let r = Resampling {
            short: 4096,
            long: 8192,
            short_weight: 0.25,
            long_weight: 3.0,
        };
        let total: f64 = len.iter().map(|&l| l as f64).sum();
        for budget in [total as u64 / 2, total as u64 * 3] {
            let c = resample_copies(&dom, &len, 2, &r, budget, false, 9);
            let out: f64 = (0..dom.len()).map(|i| c[i] as f64 * len[i] as f64).sum();
            assert!(
                (out / budget as f64 - 1.0).abs() < 0.01,
                "total {out} vs budget {budget}"
            );
            // Domain shares kept (to within a percent of the domain's tokens).
            for d in 0..2u32 {
                let share_in: f64 = (0..dom.len())
                    .filter(|&i| dom[i] == d)
                    .map(|i| len[i] as f64)
                    .sum::<f64>()
                    / total;
                let share_out: f64 = (0..dom.len())
                    .filter(|&i| dom[i] == d)
                    .map(|i| c[i] as f64 * len[i] as f64)
                    .sum::<f64>()
                    / out;
                assert!(
                    (share_out / share_in - 1.0).abs() < 0.01,
                    "domain {d}: {share_in} -> {share_out}"
                );
            }
            // Per bucket the copy rate follows the weights: long / mid = 3, short / mid = 0.25.
            let rate = |d: u32, b: usize| {
                let (mut i_tok, mut o_tok) = (0.0, 0.0);
                for i in 0..dom.len() {
                    if dom[i] == d && bucket_of(len[i] as usize, &r) == b {
                        i_tok += len[i] as f64;
                        o_tok += c[i] as f64 * len[i] as f64;
                    }
                }
                o_tok / i_tok
            };
            for d in 0..2 {
                let mid = rate(d, 1);
                assert!(
                    (rate(d, 2) / mid / 3.0 - 1.0).abs() < 0.05,
                    "long/mid in domain {d}"
                );
                assert!(
                    (rate(d, 0) / mid / 0.25 - 1.0).abs() < 0.1,
                    "short/mid in domain {d}"
                );
            }
        }
    }

    #[test]
    fn separator_is_added_as_a_special_token_when_missing() {
        use tokenizers::models::wordlevel::WordLevel;
        let vocab = [
            ("a".to_string(), 0u32),
            ("b".to_string(), 1),
            ("[UNK]".to_string(), 2),
        ]
        .into_iter()
        .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        let (id, how) = ensure_separator(&mut tok, "<s>").unwrap();
        assert_eq!((id, how), (3, SeparatorSource::Added));
        // Now one token, never split, and found again without adding.
        assert_eq!(tok.encode("a<s>b", false).unwrap().get_ids(), &[0, 3, 1]);
        assert_eq!(
            ensure_separator(&mut tok, "<s>").unwrap(),
            (3, SeparatorSource::Existing)
        );
    }

    #[test]
    fn separator_takes_the_lowest_reserved_special_token_slot() {
        use tokenizers::models::wordlevel::WordLevel;
        let vocab = [("a".to_string(), 0u32), ("[UNK]".to_string(), 1)]
            .into_iter()
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        // As Llama 3: specials after the BPE vocabulary, reserved ones not in numeric order.
        let specials = [
            "<|begin_of_text|>",
            "<|reserved_special_token_1|>",
            "<|reserved_special_token_0|>",
            "<|eot_id|>",
        ];
        tok.add_special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let before = tok.get_vocab_size(true);
        let reserved0 = tok.token_to_id("<|reserved_special_token_0|>").unwrap();
        assert_eq!(reserved0, 4);
        let (id, how) = ensure_separator(&mut tok, "<s>").unwrap();
        assert_eq!(
            (id, how),
            (
                4,
                SeparatorSource::Reserved("<|reserved_special_token_0|>".into())
            )
        );
        assert_eq!(tok.get_vocab_size(true), before, "no new id");
        assert_eq!(tok.token_to_id("<|reserved_special_token_0|>"), None);
        assert_eq!(tok.token_to_id("<|reserved_special_token_1|>"), Some(3));
        assert_eq!(tok.encode("a<s>a", false).unwrap().get_ids(), &[0, 4, 0]);
        assert_eq!(tok.decode(&[4], false).unwrap(), "<s>");
    }

    #[test]
    fn resampling_is_deterministic_for_a_seed() {
        let (dom, len) = corpus();
        let r = Resampling::default();
        let a = resample_copies(&dom, &len, 2, &r, 10_000_000, true, 3);
        assert_eq!(a, resample_copies(&dom, &len, 2, &r, 10_000_000, true, 3));
        assert_ne!(a, resample_copies(&dom, &len, 2, &r, 10_000_000, true, 4));
    }
}
