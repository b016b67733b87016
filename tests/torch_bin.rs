//! PyTorch state-dict files load exactly as PyTorch reads them: the fixtures in
//! tests/fixtures/torch_bin/ were written by torch.save and transformers' save_pretrained
//! (bench/make_torch_bin_fixtures.py), each beside `expected.safetensors`, PyTorch's own f32
//! reading of the same tensors. CI has no torch: only the committed files are read here.

use std::path::{Path, PathBuf};

use ultralong::io::{
    DType, HostTensor, MappedTensors, TORCH_INDEX_FILE, TORCH_SINGLE_FILE, TensorMap,
    load_safetensors_dir, load_safetensors_file, save_safetensors_dir,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_bin")
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Same names, shapes and bit patterns.
fn assert_same(got: &TensorMap, want: &TensorMap, what: &str) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: names"
    );
    for (name, w) in want {
        let g = &got[name];
        assert_eq!(g.shape, w.shape, "{what}: shape of {name}");
        let bits = |t: &HostTensor| t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(g), bits(w), "{what}: values of {name}");
    }
}

#[test]
fn torch_bin_f32_bf16_f16_and_protocol4_equal_pytorchs_reading() {
    for dir in ["f32", "bf16", "f16", "protocol4"] {
        let d = fixtures().join(dir);
        let want = load_safetensors_file(&d.join("expected.safetensors")).unwrap();
        assert!(want.len() >= 8, "{dir}: {:?}", want.keys());
        let got = load_safetensors_dir(&d).unwrap();
        assert_same(&got, &want, dir);
        // The file alone reads the same.
        let single = MappedTensors::open_file(&d.join(TORCH_SINGLE_FILE)).unwrap();
        assert_same(&single.read_all().unwrap(), &want, dir);
    }
}

#[test]
fn torch_bin_tied_pair_offset_scalar_empty_and_strided_row() {
    let d = fixtures().join("f32");
    let m = MappedTensors::open_dir(&d).unwrap();
    let want = load_safetensors_file(&d.join("expected.safetensors")).unwrap();
    // Tied weights: two names on one storage read the same values.
    let embed = m.read("model.embed_tokens.weight").unwrap();
    assert_eq!(embed.shape, vec![5, 4]);
    assert_eq!(embed.data, m.read("lm_head.weight").unwrap().data);
    // Rows 2..5 of a [6, 4] storage: reading from offset 0 would give other values.
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(m.shape(q), Some(&[3usize, 4][..]));
    assert_eq!(m.read(q).unwrap().data, want[q].data);
    assert_eq!(m.shape("scale"), Some(&[][..]));
    assert_eq!(m.read("scale").unwrap().data, vec![0.375]);
    assert_eq!(m.shape("empty"), Some(&[0usize, 4][..]));
    assert!(m.read("empty").unwrap().data.is_empty());
    assert_eq!(m.read("row").unwrap().data, want["row"].data);
    assert_eq!(m.read("param").unwrap().shape, vec![2, 3]);
}

#[test]
fn torch_bin_f16_specials() {
    let m = MappedTensors::open_dir(&fixtures().join("f16")).unwrap();
    let s = m.read("special").unwrap().data;
    assert_eq!(s[0], 2f32.powi(-24));
    assert_eq!(s[1], f32::INFINITY);
    assert_eq!(s[2].to_bits(), (-0.0f32).to_bits());
    assert_eq!(s[3], 65504.0);
}

#[test]
fn torch_bin_rows_and_cols_equal_slices_of_the_whole() {
    for dir in ["f32", "bf16"] {
        let d = fixtures().join(dir);
        let m = MappedTensors::open_dir(&d).unwrap();
        let want = load_safetensors_file(&d.join("expected.safetensors")).unwrap();
        let q = "model.layers.0.self_attn.q_proj.weight";
        let w = &want[q].data;
        let rows = m.read_rows(q, 1..3).unwrap();
        assert_eq!(rows.shape, vec![2, 4]);
        assert_eq!(rows.data, w[4..12].to_vec(), "{dir}");
        let cols = m.read_cols(q, 1..3).unwrap();
        assert_eq!(cols.shape, vec![3, 2]);
        assert_eq!(
            cols.data,
            vec![w[1], w[2], w[5], w[6], w[9], w[10]],
            "{dir}"
        );
    }
}

#[test]
fn torch_bin_sharded_index_from_save_pretrained() {
    let d = fixtures().join("sharded");
    assert!(d.join(TORCH_INDEX_FILE).is_file());
    let want = load_safetensors_file(&fixtures().join("sharded.expected.safetensors")).unwrap();
    let m = MappedTensors::open_dir(&d).unwrap();
    assert_same(&m.read_all().unwrap(), &want, "sharded");
    // Tied embeddings saved by transformers: both names, one storage.
    assert_eq!(
        m.read("lm_head.weight").unwrap().data,
        m.read("model.embed_tokens.weight").unwrap().data
    );
    let name = "model.layers.0.mlp.down_proj.weight";
    let w = &want[name];
    let cols = m.read_cols(name, 3..5).unwrap();
    let n = w.shape[1];
    let expect: Vec<f32> = (0..w.shape[0])
        .flat_map(|r| w.data[r * n + 3..r * n + 5].to_vec())
        .collect();
    assert_eq!(cols.data, expect);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn torch_bin_safetensors_is_preferred_when_both_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::copy(
        fixtures().join("f32").join(TORCH_SINGLE_FILE),
        d.join(TORCH_SINGLE_FILE),
    )
    .unwrap();
    let mut other = TensorMap::new();
    other.insert(
        "only.safetensors".into(),
        HostTensor::new(vec![2], vec![1.0, 2.0]),
    );
    other.insert(
        "also.safetensors".into(),
        HostTensor::new(vec![1], vec![-3.0]),
    );
    save_safetensors_dir(d, &other, DType::F32, 1 << 30).unwrap();
    assert_same(&load_safetensors_dir(d).unwrap(), &other, "both");
    // A sharded safetensors index also wins over pytorch_model.bin.
    save_safetensors_dir(d, &other, DType::F32, 4).unwrap();
    assert!(!d.join("model.safetensors").exists());
    assert_same(&load_safetensors_dir(d).unwrap(), &other, "both, sharded");
    // Without safetensors the PyTorch weights load.
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().contains("safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let want = load_safetensors_file(&fixtures().join("f32/expected.safetensors")).unwrap();
    assert_same(&load_safetensors_dir(d).unwrap(), &want, "bin only");
}

#[test]
fn torch_bin_forbidden_global_is_refused_and_named() {
    let evil = fixtures().join("refused/evil.bin");
    let e = err_text(MappedTensors::open_file(&evil));
    assert!(
        e.contains("evil.bin")
            && e.contains("global os.system is not allowed")
            && e.contains("GLOBAL")
            && e.contains("at byte 2"),
        "{e}"
    );
    // Also as a model directory's weights.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(&evil, tmp.path().join(TORCH_SINGLE_FILE)).unwrap();
    let e = err_text(load_safetensors_dir(tmp.path()));
    assert!(
        e.contains(TORCH_SINGLE_FILE) && e.contains("os.system"),
        "{e}"
    );
}

#[test]
fn torch_bin_unreadable_tensors_are_named() {
    let r = fixtures().join("refused");
    let e = err_text(MappedTensors::open_file(&r.join("transposed.bin")));
    assert!(
        e.contains("tensor w in") && e.contains("transposed.bin") && e.contains("non-contiguous"),
        "{e}"
    );
    let e = err_text(MappedTensors::open_file(&r.join("int64.bin")));
    assert!(
        e.contains("tensor ids in") && e.contains("int64.bin") && e.contains("I64"),
        "{e}"
    );
    let e = err_text(MappedTensors::open_file(&r.join("legacy.bin")));
    assert!(
        e.contains("legacy.bin") && e.contains("legacy format"),
        "{e}"
    );
}

#[test]
fn torch_bin_missing_shard_and_damaged_files_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixtures().join("sharded"), &d);
    let victim = "pytorch_model-00002-of-00002.bin";
    std::fs::remove_file(d.join(victim)).unwrap();
    let e = err_text(MappedTensors::open_dir(&d));
    assert!(
        e.contains(victim) && e.contains(TORCH_INDEX_FILE) && e.contains("does not exist"),
        "{e}"
    );

    let bytes = std::fs::read(fixtures().join("f32").join(TORCH_SINGLE_FILE)).unwrap();
    let p = tmp.path().join("x.bin");
    // Truncated anywhere: an error naming the file.
    for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = err_text(MappedTensors::open_file(&p));
        assert!(e.contains("x.bin"), "cut {cut}: {e}");
    }
    // (Every byte of a pickle changed: io::torch_bin's unit tests, in memory.)
}

/// The tiny Llama transformers saved as sharded .bin (bf16, tied embeddings) loads through
/// `Llama::load` and gives transformers' logits (its f32 forward of the same weights).
#[test]
fn torch_bin_llama_from_save_pretrained_gives_transformers_logits() {
    use ultralong::backend::cpu::CpuBackend;
    use ultralong::model::llama::{Head, Llama, Workspace};

    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("sharded.logits.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = serde_json::from_value(reference["tokens"].clone()).unwrap();
    let theirs: Vec<f32> = serde_json::from_value(reference["logits"].clone()).unwrap();

    let b = CpuBackend::<f32>::new();
    let model = Llama::load(&b, &fixtures().join("sharded"), "exact".parse().unwrap()).unwrap();
    let mut ws = Workspace::new(&b, &model.cfg, ids.len(), false, 16);
    let mut ours = Vec::new();
    model.forward_backward(&b, &mut ws, &ids, 0, Head::Logits(&mut ours), None);
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(&theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    eprintln!("logits max relative error {err:.3e}");
    assert!(err < 1e-5, "logits relative error {err:e}");
}
