//! What a cluster user reads and runs first: the paper configs run on the GPU and the toy ones on
//! the CPU; the tables and plan figures in REPRODUCE.md and the configs are what `plan` prints
//! today (scripts/gen-doc-tables.sh --check); the slurm scripts refuse to submit without a model
//! or a dataset; slurm/smoke-gpu.sh parses and its layout/compare logic runs on the CPU backend.

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn backend_of(config: &str) -> String {
    let text = std::fs::read_to_string(repo().join(config)).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    doc["train"]
        .get("backend")
        .and_then(|v| v.as_str())
        .unwrap_or("cpu")
        .to_string()
}

#[test]
fn paper_configs_run_on_the_gpu_and_toy_configs_on_the_cpu() {
    for m in ["1m", "2m", "4m"] {
        for c in [
            format!("configs/ultralong-{m}.toml"),
            format!("configs/sft-{m}.toml"),
        ] {
            assert_eq!(backend_of(&c), "cuda", "{c}");
        }
    }
    for dir in ["configs/debug", "configs/demo"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let rel = p
                    .strip_prefix(repo())
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                assert_eq!(backend_of(&rel), "cpu", "{rel}");
            }
        }
    }
}
