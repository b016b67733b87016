//! Plain files of a Hugging Face directory: SHA-256 digests, tokenizer files.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::atomic::write_atomic;

/// Tokenizer and generation files that travel with a model directory (those that exist are copied).
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
];

/// SHA-256 hex of a file (streamed), for manifests/checkpoint metadata.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        File::open(path).with_context(|| format!("opening {} to hash it", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading {} to hash it", path.display()));
            }
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Copy tokenizer and generation files that exist in `src` to `dst` (created if missing):
/// see [`TOKENIZER_FILES`]. Returns the names copied, in that order.
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<Vec<String>> {
    if !src.is_dir() {
        bail!(
            "cannot copy tokenizer files: source directory {} does not exist",
            src.display()
        );
    }
    fs::create_dir_all(dst).with_context(|| format!("creating directory {}", dst.display()))?;
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let from = src.join(name);
        if !from.is_file() {
            continue;
        }
        let bytes = fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
        write_atomic(&dst.join(name), &bytes)?;
        copied.push(name.to_string());
    }
    Ok(copied)
}

/// Like [`copy_tokenizer_files`] over several directories: each file comes from the first of
/// `srcs` that has it (a prepared dataset's separator-carrying tokenizer before the starting
/// model's). Directories that do not exist are skipped. Returns the names copied.
pub fn copy_tokenizer_files_layered(srcs: &[&Path], dst: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(dst).with_context(|| format!("creating directory {}", dst.display()))?;
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let Some(from) = srcs.iter().map(|s| s.join(name)).find(|f| f.is_file()) else {
            continue;
        };
        let bytes = fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
        write_atomic(&dst.join(name), &bytes)?;
        copied.push(name.to_string());
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let e = dir.path().join("empty");
        fs::write(&e, b"").unwrap();
        assert_eq!(
            sha256_file(&e).unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // Longer than the read buffer, so the streaming loop runs more than once.
        let big = dir.path().join("big");
        fs::write(&big, vec![b'a'; 1_000_000 * 3]).unwrap();
        let mut h = Sha256::new();
        h.update(vec![b'a'; 1_000_000 * 3]);
        let want: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sha256_file(&big).unwrap(), want);
        let err = sha256_file(&dir.path().join("missing.bin")).unwrap_err();
        assert!(format!("{err:#}").contains("missing.bin"), "{err:#}");
    }

    #[test]
    fn copy_tokenizer_files_copies_what_exists_and_skips_the_rest() {
        let src = tempfile::tempdir().unwrap();
        let dst_root = tempfile::tempdir().unwrap();
        let dst = dst_root.path().join("out");
        fs::write(src.path().join("tokenizer.json"), b"{\"tok\":1}").unwrap();
        fs::write(src.path().join("generation_config.json"), b"{\"gen\":2}").unwrap();
        fs::write(src.path().join("config.json"), b"{}").unwrap(); // not a tokenizer file
        let copied = copy_tokenizer_files(src.path(), &dst).unwrap();
        assert_eq!(copied, vec!["tokenizer.json", "generation_config.json"]);
        assert_eq!(
            fs::read(dst.join("tokenizer.json")).unwrap(),
            b"{\"tok\":1}"
        );
        assert_eq!(
            fs::read(dst.join("generation_config.json")).unwrap(),
            b"{\"gen\":2}"
        );
        assert!(!dst.join("config.json").exists());
        assert!(!dst.join("tokenizer_config.json").exists());
        assert!(!dst.join("tokenizer.model").exists());

        let err = copy_tokenizer_files(&src.path().join("nope"), &dst).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }
}
