//! The Llama-3.1 chat template, tokenized: `prepare sft` renders training samples with it (and
//! their loss masks), `eval` and `generate` their prompts.
//!
//! Template: exactly what Hugging Face's `apply_chat_template` renders for
//! meta-llama/Llama-3.1-8B-Instruct (tokenizer_config.json `chat_template`, no tools, no
//! `date_string` passed, so its fallback date):
//!
//! ```text
//! <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n
//! Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n{system|trim}<|eot_id|>
//! then per remaining message: <|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>
//! ```
//!
//! The system block with the "Cutting Knowledge Date" preamble is always there (with an empty
//! system text when the first message is not `system`), since that is what the released
//! Instruct model saw and what inference servers render. A `system` message later in the
//! conversation is rendered like any other turn. Text between special tokens is tokenized as
//! one piece, so the ids equal tokenizing the whole rendered string (as HF does).

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

/// One chat turn of the `messages` format.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Token ids of the Llama-3 chat template's special tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    pub begin_of_text: u32,
    pub start_header: u32,
    pub end_header: u32,
    pub eot: u32,
}

/// What the Llama-3.1 template puts at the top of the system block (its fallback date: HF's
/// Llama-3.1 template only probes `strftime_now` from Llama-3.2 on).
pub const SYSTEM_PREAMBLE: &str =
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";

pub(crate) const ROLES: [&str; 3] = ["system", "user", "assistant"];

impl ChatTemplate {
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let id = |name: &str| {
            tok.token_to_id(name).ok_or_else(|| {
                anyhow!(
                    "the tokenizer has no {name} token: the Llama-3 chat template needs \
                     <|begin_of_text|>, <|start_header_id|>, <|end_header_id|> and <|eot_id|>"
                )
            })
        };
        Ok(Self {
            begin_of_text: id("<|begin_of_text|>")?,
            start_header: id("<|start_header_id|>")?,
            end_header: id("<|end_header_id|>")?,
            eot: id("<|eot_id|>")?,
        })
    }
}

/// Token ids and the loss mask (true on trained targets) of one sample.
pub type Encoded = (Vec<u32>, Vec<bool>);

/// Jinja's `trim` is Python's `str.strip()`, whose whitespace also includes the separators
/// U+001C..U+001F that Rust's `char::is_whitespace` leaves out.
pub(crate) fn jinja_trim(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Appends `<|start_header_id|>role<|end_header_id|>` + "\n\n" + `body` + `<|eot_id|>`, with the
/// mask true on the tokens of `body` and the `<|eot_id|>` when `train`.
fn push_turn(
    tok: &Tokenizer,
    t: &ChatTemplate,
    role: &str,
    prefix: &str,
    body: &str,
    train: bool,
    (ids, mask): &mut Encoded,
) -> Result<()> {
    let encode = |s: &str| {
        tok.encode(s, false)
            .map_err(|e| anyhow!("tokenizing {s:?}: {e}"))
    };
    ids.push(t.start_header);
    ids.extend_from_slice(encode(role)?.get_ids());
    ids.push(t.end_header);
    mask.resize(ids.len(), false);
    // "\n\n" + preamble + body is one piece of text between special tokens in the rendered
    // string: tokenize it as one, and mark as body the tokens that end inside the body.
    let text = format!("\n\n{prefix}{body}");
    let head = text.len() - body.len();
    let enc = encode(&text)?;
    for (&id, &(_, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
        ids.push(id);
        mask.push(train && end > head);
    }
    ids.push(t.eot);
    mask.push(train);
    Ok(())
}

/// Llama-3.1 chat template (see the module comment) and the loss mask: true exactly on the
/// tokens of assistant message contents and their closing `<|eot_id|>` (the model must learn to
/// stop), false on everything else. Roles must be system, user or assistant.
pub fn encode_chat(tok: &Tokenizer, t: &ChatTemplate, messages: &[Message]) -> Result<Encoded> {
    let (system, rest) = match messages.split_first() {
        Some((m, rest)) if m.role == "system" => (jinja_trim(&m.content), rest),
        _ => ("", messages),
    };
    let mut out: Encoded = (vec![t.begin_of_text], vec![false]);
    push_turn(tok, t, "system", SYSTEM_PREAMBLE, system, false, &mut out)?;
    for m in rest {
        if !ROLES.contains(&m.role.as_str()) {
            bail!("role {:?} is not one of {ROLES:?}", m.role);
        }
        let train = m.role == "assistant";
        push_turn(tok, t, &m.role, "", jinja_trim(&m.content), train, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokenizers::AddedToken;
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;

    const SPECIALS: [&str; 4] = [
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ];

    /// A small byte-level BPE (the Llama-3 tokenizer's kind) trained on a few KB, with the
    /// Llama-3 special tokens.
    pub(crate) fn test_tokenizer() -> Tokenizer {
        let corpus: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "The quick brown fox {i} jumps over the lazy dog.\nWhat is {i} plus {i}? \
                     It is {}. Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n\
                     system user assistant hello world, answer the question.",
                    2 * i
                )
            })
            .collect();
        let mut tok = Tokenizer::new(BPE::default());
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::default()));
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(500)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        tok.train(&mut trainer, corpus.iter()).unwrap();
        tok.add_special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)))
            .unwrap();
        tok
    }

    pub(crate) fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// The Llama-3.1 template rendered as a string, independently of `encode_chat`.
    fn render(messages: &[Message]) -> String {
        let mut s = String::from("<|begin_of_text|>");
        let (sys, rest) = if messages[0].role == "system" {
            (messages[0].content.trim(), &messages[1..])
        } else {
            ("", messages)
        };
        s += "<|start_header_id|>system<|end_header_id|>\n\n";
        s += "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
        s += sys;
        s += "<|eot_id|>";
        for m in rest {
            s += &format!(
                "<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>",
                m.role,
                m.content.trim()
            );
        }
        s
    }

    fn conversation() -> Vec<Message> {
        vec![
            msg("system", "  You answer the question.\n"),
            msg("user", "What is 3 plus 3?"),
            msg("assistant", "It is 6.\n"),
            msg("user", " hello world, (quick) fox?"),
            msg(
                "assistant",
                "The lazy dog jumps over the brown fox 42 times.",
            ),
        ]
    }

    #[test]
    fn chat_template_matches_the_rendered_string() {
        let tok = test_tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap();
        for msgs in [
            conversation(),
            conversation()[1..].to_vec(),
            vec![msg("user", "hi"), msg("assistant", "hello")],
        ] {
            let (ids, mask) = encode_chat(&tok, &t, &msgs).unwrap();
            assert_eq!(ids.len(), mask.len());
            let want = render(&msgs);
            assert_eq!(tok.decode(&ids, false).unwrap(), want);
            // The same ids as tokenizing the whole rendered string, as HF's
            // apply_chat_template(tokenize=True) does.
            let whole = tok.encode(want.as_str(), false).unwrap();
            assert_eq!(ids, whole.get_ids());
            assert_eq!(ids[0], t.begin_of_text);
            assert_eq!(ids.iter().filter(|&&i| i == t.begin_of_text).count(), 1);
            let turns = 1 + msgs.iter().filter(|m| m.role != "system").count();
            assert_eq!(ids.iter().filter(|&&i| i == t.eot).count(), turns);
            assert_eq!(ids.iter().filter(|&&i| i == t.start_header).count(), turns);
            assert_eq!(*ids.last().unwrap(), t.eot);
        }
    }

    #[test]
    fn sft_masks_cover_exactly_the_assistant_tokens() {
        let tok = test_tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap();
        let msgs = conversation();
        let (ids, mask) = encode_chat(&tok, &t, &msgs).unwrap();
        let assistant: Vec<&str> = msgs
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| m.content.trim())
            .collect();
        let want: usize = assistant
            .iter()
            .map(|c| tok.encode(*c, false).unwrap().get_ids().len() + 1)
            .sum();
        assert_eq!(mask.iter().filter(|&&m| m).count(), want);
        // The masked tokens form one run per assistant turn: its content, then <|eot_id|>,
        // right after the assistant header.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, &m) in mask.iter().enumerate() {
            match (m, runs.last_mut()) {
                (true, Some((_, end))) if *end == i => *end = i + 1,
                (true, _) => runs.push((i, i + 1)),
                _ => {}
            }
        }
        assert_eq!(runs.len(), assistant.len());
        let header = tok
            .encode("<|start_header_id|>assistant<|end_header_id|>\n\n", false)
            .unwrap();
        let header = header.get_ids();
        for ((start, end), content) in runs.iter().zip(&assistant) {
            assert_eq!(ids[end - 1], t.eot);
            assert_eq!(&ids[start - header.len()..*start], header);
            assert_eq!(
                tok.decode(&ids[*start..*end], false).unwrap(),
                format!("{content}<|eot_id|>")
            );
        }
    }

    #[test]
    fn missing_special_token_is_named() {
        let mut tok = Tokenizer::new(BPE::default());
        tok.add_special_tokens(SPECIALS[..3].iter().map(|s| AddedToken::from(*s, true)))
            .unwrap();
        let err = ChatTemplate::from_tokenizer(&tok).unwrap_err();
        assert!(err.to_string().contains("<|eot_id|>"), "{err}");
    }

    #[test]
    fn jinja_trim_is_python_strip() {
        assert_eq!(jinja_trim("\u{1f} \t a b\n\u{1c}\u{a0}"), "a b");
        assert_eq!(jinja_trim("x"), "x");
    }
}
