//! Training data for single-rank runs: one token stream (a tokenized text file or a token file)
//! cut into consecutive windows of `seq_len + 1` tokens, wrapping at the end. The position is a
//! sequence counter, saved in checkpoints, so a resumed run reads exactly the sequences an
//! uninterrupted one would. (The data issue replaces this with Megatron indexed datasets.)

use std::path::Path;

use anyhow::{Context, Result, bail};

/// Load token ids: `.json` (array of integers) or anything else as little-endian u32.
pub fn load_token_file(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        let ids: Vec<u32> = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}: expected a JSON array of non-negative token ids",
                path.display()
            )
        })?;
        return Ok(ids);
    }
    if bytes.len() % 4 != 0 {
        bail!(
            "{}: {} bytes is not a whole number of little-endian u32 tokens",
            path.display(),
            bytes.len()
        );
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Tokenize a UTF-8 text file with a HF tokenizer.json (no special tokens added).
pub fn tokenize_text_file(text: &Path, tokenizer: &Path) -> Result<Vec<u32>> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", tokenizer.display()))?;
    let body = std::fs::read_to_string(text)
        .with_context(|| format!("cannot read text file {}", text.display()))?;
    // Encode line blocks in parallel: tokenizers' batch API uses all cores.
    let blocks: Vec<String> = body
        .split_inclusive('\n')
        .collect::<Vec<_>>()
        .chunks(64)
        .map(|c| c.concat())
        .collect();
    let enc = tok
        .encode_batch(blocks, false)
        .map_err(|e| anyhow::anyhow!("{}: tokenization failed: {e}", text.display()))?;
    Ok(enc
        .iter()
        .flat_map(|e| e.get_ids().iter().copied())
        .collect())
}

/// A cyclic stream of training windows.
pub struct TokenStream {
    tokens: Vec<u32>,
    seq_len: usize,
}

impl TokenStream {
    pub fn new(tokens: Vec<u32>, seq_len: usize, vocab: usize, source: &str) -> Result<Self> {
        if tokens.len() < seq_len + 1 {
            bail!(
                "{source}: {} tokens, fewer than one training window of seq_len + 1 = {}",
                tokens.len(),
                seq_len + 1
            );
        }
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= vocab)
        {
            bail!("{source}: token {t} at index {i} is outside the model's vocabulary of {vocab}");
        }
        Ok(TokenStream { tokens, seq_len })
    }

    pub fn len_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Window number `index`: inputs `seq_len` ids and their next-token targets.
    pub fn window(&self, index: u64) -> (Vec<u32>, Vec<i32>) {
        let n = self.tokens.len();
        let start = (index as u128 * self.seq_len as u128 % n as u128) as usize;
        let w: Vec<u32> = (0..=self.seq_len)
            .map(|i| self.tokens[(start + i) % n])
            .collect();
        (
            w[..self.seq_len].to_vec(),
            w[1..].iter().map(|&t| t as i32).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shift_and_wrap() {
        let s = TokenStream::new((0..10).collect(), 4, 100, "t").unwrap();
        assert_eq!(s.window(0), (vec![0, 1, 2, 3], vec![1, 2, 3, 4]));
        assert_eq!(s.window(1), (vec![4, 5, 6, 7], vec![5, 6, 7, 8]));
        assert_eq!(s.window(2), (vec![8, 9, 0, 1], vec![9, 0, 1, 2]));
    }

    #[test]
    fn out_of_vocab_is_named() {
        let e = TokenStream::new(vec![1, 2, 300, 4, 5, 6], 2, 256, "x.bin")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("300") && e.contains("index 2") && e.contains("x.bin"),
            "{e}"
        );
    }
}
