//! `prepare cpt` end to end: separators, packing, compressed inputs, bad input, determinism.

mod common;
use common::*;

use std::io::Write;
use std::path::Path;

use ultralong::data::indexed::IndexedDataset;

/// Documents with distinct, recognisable texts; `n` of them, of varied lengths.
fn write_corpus(path: &Path, n: usize) -> Vec<String> {
    let mut docs = vec![];
    let mut f = std::fs::File::create(path).unwrap();
    for i in 0..n {
        let words = 5 + (i * 37) % 120;
        let text: String = (0..words)
            .map(|w| format!("w{} ", (i * 7 + w) % 50))
            .collect::<String>()
            + &format!("end{i}");
        let domain = if i % 3 == 0 { "code" } else { "web" };
        writeln!(f, "{}", serde_json::json!({"text": text, "domain": domain})).unwrap();
        docs.push(text);
    }
    docs
}

fn stream(dir: &Path) -> Vec<u32> {
    let ds = IndexedDataset::open(&dir.join("tokens")).unwrap();
    (0..ds.len()).flat_map(|i| ds.get(i).unwrap()).collect()
}

#[test]
fn separators_packing_and_determinism() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    write_corpus(&p.join("c.jsonl"), 1000);
    let args = |out: &str| {
        vec![
            "prepare",
            "cpt",
            "--input",
            "c.jsonl",
            "--tokenizer",
            "m",
            "--seq-len",
            "64",
            "--tokens",
            "200000",
            "--out",
            out,
            "--domain-field",
            "domain",
            "--short",
            "40",
            "--long",
            "100",
            "--seed",
            "3",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>()
    };
    let a: Vec<String> = args("ds");
    let out = ok(p, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tokens_out = report["tokens_out"].as_u64().unwrap();
    assert!(
        (tokens_out as f64 / 200000.0 - 1.0).abs() < 0.01,
        "budget: {tokens_out}"
    );
    let sep = report["separator_id"].as_u64().unwrap() as u32;
    let s = stream(&p.join("ds"));
    assert_eq!(s.len() % 64, 0, "whole sequences only");
    assert_eq!(s.len() as u64, report["tokens_packed"].as_u64().unwrap());
    // Exactly one separator between consecutive documents: never two in a row, and every complete
    // piece between two separators is one whole document (each ends with its "endN" marker).
    assert!(s.windows(2).all(|w| !(w[0] == sep && w[1] == sep)));
    let tok = tokenizers::Tokenizer::from_file(p.join("ds/tokenizer.json")).unwrap();
    let pieces: Vec<&[u32]> = s.split(|&t| t == sep).collect();
    assert!(pieces.len() > 10);
    for piece in &pieces[1..pieces.len() - 1] {
        let text = tok.decode(piece, false).unwrap();
        assert!(
            text.trim_start().starts_with('w') && text.contains("end"),
            "not one whole document: {text:?}"
        );
        assert_eq!(
            text.matches("end").count(),
            1,
            "two documents without a separator: {text:?}"
        );
    }
    assert!(p.join("ds/manifest.json").exists() && p.join("ds/doc_starts.u64").exists());
    // The ablation without separators: the same documents in the same order, joined directly.
    let mut a = args("nosep");
    a.push("--no-separator".into());
    ok(p, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let n = stream(&p.join("nosep"));
    assert!(!n.contains(&sep), "no separator in the stream");
    let joined: Vec<u32> = s.iter().copied().filter(|&t| t != sep).collect();
    let common = joined.len().min(n.len());
    assert!(common > 1000);
    assert_eq!(joined[..common], n[..common], "same documents, same order");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("nosep/manifest.json")).unwrap())
            .unwrap();
    assert!(m["separator"].is_null());
    // Same inputs and seed: byte-identical output, also from a gzip and a zstd copy of the input.
    let raw = std::fs::read(p.join("c.jsonl")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    std::fs::write(p.join("c.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(
        p.join("c.jsonl.zst"),
        zstd::encode_all(&raw[..], 3).unwrap(),
    )
    .unwrap();
    for (input, out) in [
        ("c.jsonl", "ds2"),
        ("c.jsonl.gz", "ds3"),
        ("c.jsonl.zst", "ds4"),
    ] {
        let mut a = args(out);
        a[3] = input.to_string();
        ok(p, &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        for f in ["tokens.bin", "tokens.idx", "doc_starts.u64"] {
            assert!(
                std::fs::read(p.join("ds").join(f)).unwrap()
                    == std::fs::read(p.join(out).join(f)).unwrap(),
                "{input}: {f}"
            );
        }
    }
}

#[test]
fn bad_lines_are_named_or_counted_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    write_corpus(&p.join("c.jsonl"), 50);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(p.join("c.jsonl"))
        .unwrap();
    f.write_all(b"{\"text\": \"fine\"\n").unwrap(); // line 51: malformed
    f.write_all(b"{\"body\": \"no text\"}\n").unwrap(); // line 52: missing field
    f.write_all(b"{\"text\": \"bad \xff utf8\"}\n").unwrap(); // line 53
    f.write_all(b"{\"text\": \"   \"}\n").unwrap(); // line 54: empty
    drop(f);
    let base = [
        "prepare",
        "cpt",
        "--input",
        "c.jsonl",
        "--tokenizer",
        "m",
        "--seq-len",
        "32",
        "--tokens",
        "2000",
        "--out",
        "ds",
    ];
    fails_with(p, &base, &["c.jsonl:51", "malformed JSON"]);
    assert!(!p.join("ds").exists(), "a failed prepare leaves no output");
    assert!(
        std::fs::read_dir(p).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp-"))
    );
    let o = run(p, &[&base[..], &["--skip-invalid"]].concat());
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    // The printed summary says what was skipped, not only report.json.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("skipped 4 input lines")
            && err.contains("1 malformed JSON")
            && err.contains("1 empty documents"),
        "{err}"
    );
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["invalid"]["malformed_json"], 1);
    assert_eq!(r["invalid"]["missing_text"], 1);
    assert_eq!(r["invalid"]["invalid_utf8"], 1);
    assert_eq!(r["invalid"]["empty_document"], 1);
    assert_eq!(r["documents_in"], 50);
}

/// A budget above the corpus repeats documents: the summary warns for each bucket it repeats,
/// and a budget the corpus covers gives no warning.
#[test]
fn a_budget_above_the_corpus_warns_per_bucket() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    write_corpus(&p.join("c.jsonl"), 300);
    let prep = |tokens: &str, out: &str| {
        let o = run(
            p,
            &[
                "prepare",
                "cpt",
                "--input",
                "c.jsonl",
                "--tokenizer",
                "m",
                "--seq-len",
                "64",
                "--tokens",
                tokens,
                "--out",
                out,
                "--short",
                "40",
                "--long",
                "100",
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        let r: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        (r, err)
    };
    let (r, err) = prep("1000000", "big");
    let tokens_in = r["tokens_in"].as_u64().unwrap();
    assert!(
        tokens_in < 1_000_000 / 4,
        "the corpus must be well below the budget"
    );
    // Each bucket's rate is far above 1 and above its weight (0.5, 1, 2): a warning for each.
    for b in ["short", "mid", "long"] {
        let st = &r["buckets"]["default"][b];
        let rate = st["tokens_out"].as_f64().unwrap() / st["tokens_in"].as_f64().unwrap();
        assert!(rate > 2.0, "{b}: rate {rate}");
        assert!(
            err.lines().any(|l| l.starts_with("warning:")
                && l.contains(&format!("{b} documents"))
                && l.contains(&format!("{rate:.2}x"))),
            "{b}: {err}"
        );
    }
    assert_eq!(r["warnings"].as_array().unwrap().len(), 3);
    let (r, err) = prep(&(tokens_in / 2).to_string(), "small");
    assert!(!err.contains("warning"), "{err}");
    assert!(r["warnings"].as_array().unwrap().is_empty());
}

#[test]
fn corpus_larger_than_the_buffer_streams() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    // ~2.5 MB of text against a 1 MB buffer: several tokenization batches.
    write_corpus(&p.join("c.jsonl"), 9000);
    let len = std::fs::metadata(p.join("c.jsonl")).unwrap().len();
    assert!(len > 2 << 20, "corpus {len} bytes");
    let out = ok(
        p,
        &[
            "prepare",
            "cpt",
            "--input",
            "c.jsonl",
            "--tokenizer",
            "m",
            "--seq-len",
            "128",
            "--tokens",
            "100000",
            "--out",
            "ds",
            "--buffer-mb",
            "1",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["documents_in"], 9000);
}

#[test]
fn parquet_and_jsonl_inputs_give_the_same_dataset() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    tiny_model(p);
    let fx = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parquet");
    for (input, out) in [("docs.parquet", "pq"), ("docs.jsonl", "js")] {
        let input = fx.join(input);
        let input = input.to_str().unwrap();
        ok(
            p,
            &[
                "prepare",
                "cpt",
                "--input",
                input,
                "--tokenizer",
                "m",
                "--seq-len",
                "32",
                "--tokens",
                "3000",
                "--out",
                out,
                "--domain-field",
                "domain",
            ],
        );
    }
    for f in ["tokens.bin", "tokens.idx", "doc_starts.u64"] {
        assert!(
            std::fs::read(p.join("pq").join(f)).unwrap()
                == std::fs::read(p.join("js").join(f)).unwrap(),
            "{f}"
        );
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p.join("pq/report.json")).unwrap()).unwrap();
    assert_eq!(r["documents_in"], 40);
    assert_eq!(
        r["buckets"].as_object().unwrap().len(),
        3,
        "three domains from the domain column"
    );
    // A file that is not Parquet is named.
    std::fs::write(p.join("bad.parquet"), b"PAR1 this is not parquet").unwrap();
    fails_with(
        p,
        &[
            "prepare",
            "cpt",
            "--input",
            "bad.parquet",
            "--tokenizer",
            "m",
            "--seq-len",
            "32",
            "--tokens",
            "3000",
            "--out",
            "x",
        ],
        &["bad.parquet", "Parquet"],
    );
}
