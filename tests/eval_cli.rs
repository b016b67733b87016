//! `ultralong generate` and `ultralong eval niah|ppl` end to end, against independent references:
//! greedy tokens against the argmax of `ultralong forward`'s logits over prompt + generated tokens,
//! perplexity buckets against `forward`'s mean loss, and every multi-rank layout (mpirun: tp, cp
//! and dp) against one rank.

mod common;

use std::path::Path;

use common::{fails_with, mpirun_ok, ok, tiny_model};
use serde_json::Value;

fn last_json(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in {stdout:?}"));
    serde_json::from_str(line).unwrap()
}

fn tokens_of(v: &Value) -> Vec<u32> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A prompt of `n` ids inside the tiny vocabulary (384), in `dir/name`.
fn write_prompt(dir: &Path, name: &str, n: usize) -> Vec<u32> {
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 37 + 11) % 300 + 2).collect();
    std::fs::write(dir.join(name), serde_json::to_string(&ids).unwrap()).unwrap();
    ids
}

#[test]
fn greedy_generation_follows_the_full_forward_and_every_cp_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_model(d);
    let prompt = write_prompt(d, "p.json", 21);
    let args = [
        "generate",
        "--model",
        "m",
        "--prompt-tokens",
        "p.json",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--precision",
        "f64",
    ];
    let one = last_json(&ok(d, &args));
    let new = tokens_of(&one);
    assert_eq!(new.len(), 8);
    assert!(one["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(one["decode_tokens_per_s"].as_f64().unwrap() > 0.0);

    // The reference: one full forward over prompt + generated; each generated token is the argmax
    // of the row before it.
    let mut all = prompt.clone();
    all.extend(&new);
    std::fs::write(d.join("all.json"), serde_json::to_string(&all).unwrap()).unwrap();
    ok(
        d,
        &[
            "forward",
            "--model",
            "m",
            "--tokens",
            "all.json",
            "--out",
            "logits.safetensors",
            "--precision",
            "f64",
        ],
    );
    let map = ultralong::io::load_safetensors_file(&d.join("logits.safetensors")).unwrap();
    let logits = &map["logits"];
    let v = logits.shape[1];
    for (i, &t) in new.iter().enumerate() {
        let row = &logits.data[(prompt.len() - 1 + i) * v..][..v];
        let arg = (0..v)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap();
        assert_eq!(
            arg as u32, t,
            "token {i}: generate picked {t}, the full forward's argmax is {arg}"
        );
    }

    // Context parallel prefill and distributed decode: the same tokens (21 tokens: padded).
    for np in [2usize, 4] {
        let mut a: Vec<&str> = args.to_vec();
        let cp = np.to_string();
        a.extend(["--cp", &cp]);
        let got = last_json(&mpirun_ok(d, np, &a));
        assert_eq!(tokens_of(&got), new, "cp {np}");
    }
    // Sampling with a seed: reproducible, and the same under cp 2.
    let mut s: Vec<&str> = args.to_vec();
    s.extend(["--temperature", "1.5", "--top-p", "0.9", "--seed", "7"]);
    let s1 = tokens_of(&last_json(&ok(d, &s)));
    assert_eq!(s1, tokens_of(&last_json(&ok(d, &s))));
    let mut s2 = s.clone();
    s2.extend(["--cp", "2"]);
    assert_eq!(s1, tokens_of(&last_json(&mpirun_ok(d, 2, &s2))));
}

/// Short sentences in the tiny tokenizer's words (it was trained on `repeating_text`).
fn haystack_text() -> String {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "pack", "my", "box",
        "with", "five", "dozen", "liquor", "jugs",
    ];
    (0..200)
        .map(|i| {
            let n = 3 + (i * 5) % 6;
            let s: Vec<&str> = (0..n)
                .map(|j| words[(i * 3 + j * 7) % words.len()])
                .collect();
            format!("{}.", s.join(" "))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn niah_writes_the_grid_with_needles_at_their_depths_on_any_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_model(d);
    std::fs::write(d.join("hay.txt"), haystack_text()).unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "eval",
            "niah",
            "--model",
            "m",
            "--lengths",
            "64,96,128",
            "--depths",
            "0,25,50,100",
            "--trials",
            "2",
            "--seed",
            "3",
            "--haystack",
            "hay.txt",
            "--digits",
            "4",
            "--max-new-tokens",
            "4",
            "--template",
            "plain",
            "--needle",
            "the fox box is {number}.",
            "--question",
            "what is the fox box?",
            "--query-format",
            " {question} the fox box is",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let a1 = args("one");
    let a1: Vec<&str> = a1.iter().map(|s| s.as_str()).collect();
    let summary = last_json(&ok(d, &a1));
    assert_eq!(summary["cells"], 24);
    let png = std::fs::read(d.join("one/niah.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("one/niah.json")).unwrap()).unwrap();
    assert_eq!(j["template"], "plain");
    let cells = j["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 24);
    let mut numbers = std::collections::HashSet::new();
    let mut n_correct = 0;
    for c in cells {
        let length = c["length"].as_u64().unwrap() as f64;
        let depth = c["depth"].as_f64().unwrap();
        let hay = c["haystack_tokens"].as_f64().unwrap();
        let at = c["needle_at"].as_f64().unwrap();
        let prompt = c["prompt_tokens"].as_f64().unwrap();
        assert!(prompt <= length, "{c}");
        // The haystack fills the length up to less than one sentence (≤ 12 tokens here, with the
        // needle and question around it).
        assert!(prompt > length - 20.0, "{c}");
        // The needle sits within a sentence of depth% of the haystack.
        assert!((at - depth / 100.0 * hay).abs() <= 12.0, "{c}");
        if depth == 0.0 {
            assert_eq!(at, 0.0);
        }
        if depth == 100.0 {
            assert_eq!(at, hay);
        }
        let number = c["number"].as_str().unwrap();
        assert_eq!(number.len(), 4);
        numbers.insert(number.to_string());
        // Scoring, recomputed: correct iff the number is a whole digit run of the output.
        let out = c["output"].as_str().unwrap();
        let expect = out
            .split(|ch: char| !ch.is_ascii_digit())
            .any(|r| r == number);
        assert_eq!(c["correct"].as_bool().unwrap(), expect, "{c}");
        n_correct += expect as usize;
    }
    assert!(numbers.len() > 20, "numbers should differ per cell");
    let overall = j["accuracy"]["overall"].as_f64().unwrap();
    assert!((overall - n_correct as f64 / 24.0).abs() < 1e-12);
    assert_eq!(j["accuracy"]["by_cell"].as_array().unwrap().len(), 12);

    // CP 2 (one prompt over two ranks) and DP 2 (cells shared): the same cells and outputs.
    let strip = |j: &Value| -> Vec<Value> {
        j["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.as_object_mut().unwrap().remove("prefill_s");
                c.as_object_mut().unwrap().remove("decode_s");
                c
            })
            .collect()
    };
    for (out, cp) in [("cp2", "2"), ("dp2", "1")] {
        let mut a = args(out);
        a.extend(["--cp".to_string(), cp.to_string()]);
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        mpirun_ok(d, 2, &a);
        let jj: Value =
            serde_json::from_str(&std::fs::read_to_string(d.join(out).join("niah.json")).unwrap())
                .unwrap();
        assert_eq!(strip(&jj), strip(&j), "{out}");
    }
}

#[test]
fn ppl_buckets_average_to_the_forward_loss_on_any_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_model(d);
    let fwd = last_json(&ok(
        d,
        &[
            "forward",
            "--model",
            "m",
            "--text",
            "text.txt",
            "--max-tokens",
            "192",
            "--sequences",
            "3",
        ],
    ));
    let reference = fwd["loss"].as_f64().unwrap();
    let run = |np: usize, cp: &str, out: &str| -> Value {
        let a = [
            "eval",
            "ppl",
            "--model",
            "m",
            "--text",
            "text.txt",
            "--seq-len",
            "64",
            "--sequences",
            "3",
            "--buckets",
            "6",
            "--cp",
            cp,
            "--out",
            out,
        ];
        if np == 1 {
            ok(d, &a)
        } else {
            mpirun_ok(d, np, &a)
        };
        serde_json::from_str(&std::fs::read_to_string(d.join(out).join("ppl.json")).unwrap())
            .unwrap()
    };
    let one = run(1, "1", "one");
    let png = std::fs::read(d.join("one/ppl.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(one["tokens"], 3 * 63);
    let buckets = one["buckets"].as_array().unwrap();
    assert_eq!(buckets[0]["start"], 1);
    assert_eq!(buckets.last().unwrap()["end"], 64);
    let (mut s, mut n) = (0.0, 0u64);
    for b in buckets {
        let t = b["tokens"].as_u64().unwrap();
        s += b["mean_loss"].as_f64().unwrap() * t as f64;
        n += t;
    }
    assert_eq!(n, 189);
    assert!(
        (s / n as f64 - reference).abs() < 1e-5 * reference,
        "{} vs {reference}",
        s / n as f64
    );
    for (np, cp, out) in [(2, "2", "cp2"), (2, "1", "dp2"), (4, "2", "cp2dp2")] {
        let j = run(np, cp, out);
        for (a, b) in j["buckets"].as_array().unwrap().iter().zip(buckets) {
            let (x, y) = (
                a["mean_loss"].as_f64().unwrap(),
                b["mean_loss"].as_f64().unwrap(),
            );
            assert!((x - y).abs() < 1e-5 * y.abs(), "{out}: {a} vs {b}");
            assert_eq!(a["tokens"], b["tokens"]);
        }
    }
}

#[test]
fn tensor_parallel_generation_and_evaluation_give_one_ranks_results() {
    // The weights split over 2 ranks (tp 2), and over 2 × 2 (tp 2 × cp 2): the greedy tokens,
    // the NIAH answers and the loss buckets of one rank holding the whole model.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_model(d);
    write_prompt(d, "p.json", 21);
    let gen_args = [
        "generate",
        "--model",
        "m",
        "--prompt-tokens",
        "p.json",
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--precision",
        "f64",
    ];
    let one = tokens_of(&last_json(&ok(d, &gen_args)));
    assert_eq!(one.len(), 8);
    for (np, tp, cp) in [(2usize, "2", "1"), (4, "2", "2")] {
        let mut a: Vec<&str> = gen_args.to_vec();
        a.extend(["--tp", tp, "--cp", cp]);
        let got = last_json(&mpirun_ok(d, np, &a));
        assert_eq!(tokens_of(&got), one, "tp {tp} cp {cp}");
        assert_eq!(got["tp"], 2);
    }

    std::fs::write(d.join("hay.txt"), haystack_text()).unwrap();
    let niah = |np: usize, tp: &str, out: &str| -> Vec<Value> {
        let a = [
            "eval",
            "niah",
            "--model",
            "m",
            "--lengths",
            "64,96",
            "--depths",
            "0,50,100",
            "--haystack",
            "hay.txt",
            "--digits",
            "4",
            "--max-new-tokens",
            "4",
            "--template",
            "plain",
            "--needle",
            "the fox box is {number}.",
            "--query-format",
            " {question} the fox box is",
            "--tp",
            tp,
            "--out",
            out,
        ];
        if np == 1 {
            ok(d, &a)
        } else {
            mpirun_ok(d, np, &a)
        };
        let j: Value =
            serde_json::from_str(&std::fs::read_to_string(d.join(out).join("niah.json")).unwrap())
                .unwrap();
        assert_eq!(
            j["layout"]["tp"].as_u64().unwrap(),
            tp.parse::<u64>().unwrap()
        );
        j["cells"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.as_object_mut().unwrap().remove("prefill_s");
                c.as_object_mut().unwrap().remove("decode_s");
                c
            })
            .collect()
    };
    let one = niah(1, "1", "niah1");
    assert_eq!(one.len(), 6);
    assert_eq!(niah(2, "2", "niah-tp2"), one);

    let ppl = |np: usize, tp: &str, out: &str| -> Vec<Value> {
        let a = [
            "eval",
            "ppl",
            "--model",
            "m",
            "--text",
            "text.txt",
            "--seq-len",
            "64",
            "--sequences",
            "2",
            "--buckets",
            "6",
            "--tp",
            tp,
            "--out",
            out,
        ];
        if np == 1 {
            ok(d, &a)
        } else {
            mpirun_ok(d, np, &a)
        };
        let j: Value =
            serde_json::from_str(&std::fs::read_to_string(d.join(out).join("ppl.json")).unwrap())
                .unwrap();
        j["buckets"].as_array().unwrap().clone()
    };
    let one = ppl(1, "1", "ppl1");
    let tp2 = ppl(2, "2", "ppl-tp2");
    assert_eq!(one.len(), tp2.len());
    for (a, b) in tp2.iter().zip(&one) {
        let (x, y) = (
            a["mean_loss"].as_f64().unwrap(),
            b["mean_loss"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-5 * y.abs(), "tp 2: {a} vs {b}");
        assert_eq!(a["tokens"], b["tokens"]);
    }
}

#[test]
fn bad_flags_and_files_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tiny_model(d);
    write_prompt(d, "p.json", 5);
    fails_with(
        d,
        &["generate", "--model", "m", "--prompt", "missing.txt"],
        &["--prompt", "missing.txt"],
    );
    fails_with(
        d,
        &[
            "generate",
            "--model",
            "m",
            "--prompt-tokens",
            "p.json",
            "--tp",
            "3",
        ],
        &["tp 3", "do not factor"],
    );
    fails_with(
        d,
        &[
            "generate",
            "--model",
            "m",
            "--prompt-tokens",
            "p.json",
            "--top-p",
            "0",
        ],
        &["--top-p"],
    );
    fails_with(
        d,
        &[
            "generate",
            "--model",
            "nowhere",
            "--prompt-tokens",
            "p.json",
        ],
        &["nowhere"],
    );
    std::fs::write(d.join("big.json"), "[1, 2, 999]").unwrap();
    fails_with(
        d,
        &["generate", "--model", "m", "--prompt-tokens", "big.json"],
        &["999", "vocabulary"],
    );
    fails_with(
        d,
        &[
            "eval",
            "niah",
            "--model",
            "m",
            "--lengths",
            "1X",
            "--out",
            "o",
        ],
        &["--lengths", "1X"],
    );
    fails_with(
        d,
        &[
            "eval", "niah", "--model", "m", "--depths", "0,150", "--out", "o",
        ],
        &["--depths", "150"],
    );
    fails_with(
        d,
        &[
            "eval",
            "niah",
            "--model",
            "m",
            "--lengths",
            "16",
            "--out",
            "o",
        ],
        &["--lengths", "16 tokens"],
    );
    fails_with(
        d,
        &[
            "eval",
            "niah",
            "--model",
            "m",
            "--lengths",
            "64",
            "--haystack",
            "nope.txt",
            "--out",
            "o",
        ],
        &["--haystack", "nope.txt"],
    );
    fails_with(
        d,
        &[
            "eval",
            "ppl",
            "--model",
            "m",
            "--text",
            "text.txt",
            "--seq-len",
            "1M",
            "--out",
            "o",
        ],
        &["text.txt", "--seq-len 1048576"],
    );
    fails_with(
        d,
        &[
            "eval",
            "ppl",
            "--model",
            "m",
            "--data",
            "no/such",
            "--seq-len",
            "64",
            "--out",
            "o",
        ],
        &["--data", "no/such"],
    );
}
