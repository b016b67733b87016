//! Evaluation: generation (`generate`: sampling and the prefill + decode loop over a `lm::Decoder`,
//! the Llama's `model::infer::Session` or the HSA model's session), needle-in-a-haystack (`niah`),
//! loss by position (`ppl`) and the synthetic recall task of the toy HSA comparison (`recall`,
//! either architecture), with
//! the pieces they share: the tokenizer, prompt templates (Llama-3.1 chat or plain text), lists
//! like `1K,4K,1M`, and gathering results over ranks.
//!
//! Layout of an evaluation run: world = tp × cp × dp, as in training (`parallel::topology`). A
//! TP group holds one copy of the model in shards; a TP × CP group prefills one prompt with ring
//! attention and decodes with its KV cache spread over the CP ranks (each TP rank caching its
//! heads); DP groups take different work items (NIAH cells, perplexity sequences), and world
//! rank 0 writes the results.

pub mod generate;
pub mod lm;
pub mod niah;
pub mod ppl;
pub mod recall;

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tokenizers::Tokenizer;

use crate::data::chat::{ChatTemplate, SYSTEM_PREAMBLE};
use crate::model::config::ModelConfig;
use crate::parallel::comm::Comm;

/// `DIR/tokenizer.json`, or an error naming it.
pub fn load_tokenizer(model_dir: &Path) -> Result<Tokenizer> {
    let path = model_dir.join("tokenizer.json");
    if !path.exists() {
        bail!(
            "{}: no tokenizer.json in the model directory (generation and evaluation need the model's tokenizer)",
            path.display()
        );
    }
    Tokenizer::from_file(&path)
        .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, false)
        .map_err(|e| anyhow!("tokenizing {:?}: {e}", short(text)))?
        .get_ids()
        .to_vec())
}

/// Text of `ids`, special tokens left out.
pub fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, true)
        .map_err(|e| anyhow!("decoding {} tokens: {e}", ids.len()))
}

fn short(s: &str) -> String {
    let mut t: String = s.chars().take(40).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    t
}

/// How a user message becomes a prompt.
#[derive(Clone, Debug)]
pub enum PromptFormat {
    /// Llama-3.1 chat: the system block (empty system, the template's date preamble), the user
    /// turn, and the assistant header; the model's answer follows.
    Chat(ChatTemplate),
    /// Plain text continuation.
    Plain,
}

impl PromptFormat {
    /// `auto` (chat when the tokenizer has the Llama-3 special tokens), `chat` or `plain`.
    pub fn choose(tok: &Tokenizer, which: &str) -> Result<Self> {
        match which {
            "auto" => Ok(ChatTemplate::from_tokenizer(tok)
                .map(PromptFormat::Chat)
                .unwrap_or(PromptFormat::Plain)),
            "chat" => Ok(PromptFormat::Chat(
                ChatTemplate::from_tokenizer(tok).context("--template chat")?,
            )),
            "plain" => Ok(PromptFormat::Plain),
            w => bail!("--template {w:?}: expected auto, chat or plain"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            PromptFormat::Chat(_) => "chat",
            PromptFormat::Plain => "plain",
        }
    }

    /// Token ids before and after the user's content: the content is spliced between them at the
    /// token level (so a haystack can be cut and a needle inserted by token index). The template
    /// is rendered as HF's Llama-3.1 template does, each text piece between special tokens
    /// tokenized on its own.
    pub fn wrap(&self, tok: &Tokenizer, after_content: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        match self {
            PromptFormat::Plain => Ok((Vec::new(), encode(tok, after_content)?)),
            PromptFormat::Chat(t) => {
                let mut pre = vec![t.begin_of_text, t.start_header];
                pre.extend(encode(tok, "system")?);
                pre.push(t.end_header);
                pre.extend(encode(tok, &format!("\n\n{SYSTEM_PREAMBLE}"))?);
                pre.push(t.eot);
                pre.push(t.start_header);
                pre.extend(encode(tok, "user")?);
                pre.push(t.end_header);
                pre.extend(encode(tok, "\n\n")?);
                let mut post = encode(tok, after_content)?;
                post.push(t.eot);
                post.push(t.start_header);
                post.extend(encode(tok, "assistant")?);
                post.push(t.end_header);
                post.extend(encode(tok, "\n\n")?);
                Ok((pre, post))
            }
        }
    }

    /// Tokens that end a generation: `<|eot_id|>` in chat, and the config's `eos_token_id`s.
    pub fn stop_tokens(&self, cfg: &ModelConfig) -> Vec<u32> {
        let mut s = cfg.eos_token_id.clone().unwrap_or_default();
        if let PromptFormat::Chat(t) = self {
            s.push(t.eot);
        }
        s
    }
}

/// A token count like `4096`, `4K` or `1M` (K = 1024, M = 1024²).
pub fn parse_count(s: &str) -> Result<usize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1024),
        Some('M' | 'm') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    let n: usize = num
        .parse()
        .map_err(|_| anyhow!("{s:?} is not a count (expected e.g. 512, 4K or 1M)"))?;
    if n == 0 {
        bail!("{s:?}: expected a positive count");
    }
    Ok(n * mult)
}

/// `n` as the shortest of `N`, `NK`, `NM`.
pub fn format_count(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// A comma-separated list, each item parsed by `f`; errors name the flag.
pub fn parse_list<T>(flag: &str, s: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let items: Vec<T> = s
        .split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| f(x).with_context(|| format!("{flag} {s:?}")))
        .collect::<Result<_>>()?;
    if items.is_empty() {
        bail!("{flag} {s:?}: expected a comma-separated list");
    }
    Ok(items)
}

/// Every rank's byte string, in rank order, on every rank of `comm`.
pub fn all_gather_bytes<C: Comm>(comm: &C, mine: &[u8]) -> Vec<Vec<u8>> {
    let n = comm.size();
    let mut lens = vec![0u64; n];
    comm.all_gather(&[mine.len() as u64], &mut lens);
    let w = lens.iter().copied().max().unwrap_or(0) as usize;
    let mut padded = mine.to_vec();
    padded.resize(w, 0);
    let mut all = vec![0u8; w * n];
    comm.all_gather(&padded, &mut all);
    all.chunks(w.max(1))
        .take(n)
        .zip(&lens)
        .map(|(c, &l)| c[..l as usize].to_vec())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_with_binary_suffixes() {
        assert_eq!(parse_count("4K").unwrap(), 4096);
        assert_eq!(parse_count("1M").unwrap(), 1 << 20);
        assert_eq!(parse_count(" 300 ").unwrap(), 300);
        assert!(parse_count("4G").is_err());
        assert!(parse_count("0").is_err());
        assert_eq!(format_count(4096), "4K");
        assert_eq!(format_count(3 << 20), "3M");
        assert_eq!(format_count(1000), "1000");
        let e = parse_list("--lengths", "1K,x", parse_count).unwrap_err();
        assert!(format!("{e:#}").contains("--lengths"), "{e:#}");
    }

    #[test]
    fn bytes_gather_in_rank_order() {
        use crate::parallel::thread::ThreadComm;
        let out = ThreadComm::run(3, |c| {
            let mine = "x".repeat(c.rank() * 2 + 1);
            all_gather_bytes(&c, mine.as_bytes())
        });
        for o in out {
            assert_eq!(o, vec![b"x".to_vec(), b"xxx".to_vec(), b"xxxxx".to_vec()]);
        }
    }
}
