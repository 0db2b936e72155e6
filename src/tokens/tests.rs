//! Counts on the fixed sample in tests/data/token_sample, against the Python tiktoken
//! figures recorded in expected.json (docs/TOKENS.md).

use super::*;
use crate::api::endpoint::Endpoint;

const ENGLISH: &str = include_str!("../../tests/data/token_sample/english.txt");
const CODE: &str = include_str!("../../tests/data/token_sample/code.txt");
const CHAT: &str = include_str!("../../tests/data/token_sample/chat.json");
const EXPECTED: &str = include_str!("../../tests/data/token_sample/expected.json");

fn expected(path: &[&str]) -> u64 {
    let v: serde_json::Value = serde_json::from_str(EXPECTED).unwrap();
    path.iter().fold(&v, |v, k| &v[k]).as_u64().unwrap()
}

#[test]
fn plain_text_matches_tiktoken() {
    let t = Tokenizers::shared();
    for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
        assert_eq!(
            t.count(enc, ENGLISH),
            expected(&[enc.name(), "english"]),
            "{}",
            enc.name()
        );
        assert_eq!(
            t.count(enc, CODE),
            expected(&[enc.name(), "code"]),
            "{}",
            enc.name()
        );
    }
}

#[test]
fn chat_prompts_match_openai_accounting() {
    let t = Tokenizers::shared();
    let prompt = ChatPrompt::parse(Endpoint::ChatCompletions, CHAT.as_bytes()).unwrap();
    for enc in [Encoding::O200kBase, Encoding::Cl100kBase] {
        assert_eq!(
            count_chat_prompt(&t, enc, &prompt),
            expected(&["chat_prompt_tokens", enc.name()]),
            "{}",
            enc.name()
        );
    }
}

#[test]
fn models_map_to_their_tokenizer_or_a_named_stand_in() {
    assert_eq!(
        Encoding::for_model("gpt-4o-mini").encoding,
        Encoding::O200kBase
    );
    assert_eq!(Encoding::for_model("o3").encoding, Encoding::O200kBase);
    assert_eq!(
        Encoding::for_model("gpt-4-turbo").encoding,
        Encoding::Cl100kBase
    );
    assert_eq!(
        Encoding::for_model("text-embedding-3-small").stand_in_for,
        None
    );
    let llama = Encoding::for_model("meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(
        (llama.encoding, llama.stand_in_for),
        (Encoding::Cl100kBase, Some("llama3"))
    );
    let mistral = Encoding::for_model("mistral-large-latest");
    assert_eq!(mistral.stand_in_for, Some("mistral-tekken"));
    assert_eq!(mistral.scale(1000), 1035);
}

#[test]
fn the_estimate_never_undercounts() {
    let t = Tokenizers::shared();
    for text in [ENGLISH, CODE, "ünïcödé ✓✓✓ 漢字漢字"] {
        let body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]})
                .to_string();
        let exact = count_chat_prompt(
            &t,
            Encoding::Cl100kBase,
            &ChatPrompt::parse(Endpoint::ChatCompletions, body.as_bytes()).unwrap(),
        );
        assert!(estimate_prompt_tokens(body.len()) >= exact);
    }
}

/// Texts whose pieces take every path of the merge: whole tokens, short pieces merged by
/// scanning, and pieces past `LARGE_PIECE` bytes merged with the heap (a long word, a long
/// run of symbols, digits, mixed scripts, whitespace runs).
fn varied_texts() -> Vec<String> {
    let mut texts = vec![ENGLISH.to_string(), CODE.to_string(), CHAT.to_string()];
    texts.push("supercalifragilisticexpialidocious".repeat(40));
    texts.push("ünïcödé✓漢字かなカナ한국어".repeat(30));
    texts.push("!@#$%^&*()_+-=[]{}|;':\",./<>?".repeat(20));
    texts.push("0123456789".repeat(50));
    texts.push(format!("a{}b\r\n\r\n  \t x", " ".repeat(700)));
    // Pseudo-random printable ASCII with few spaces: long pieces of odd byte pairs.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random: String = (0..6000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'!' + (x % 94) as u8) as char
        })
        .collect();
    texts.push(random);
    texts
}

#[test]
fn counts_equal_tiktoken_rs_on_every_path() {
    let t = Tokenizers::shared();
    let reference = [
        (Encoding::Cl100kBase, tiktoken_rs::cl100k_base().unwrap()),
        (Encoding::O200kBase, tiktoken_rs::o200k_base().unwrap()),
    ];
    for text in varied_texts() {
        for (enc, bpe) in &reference {
            assert_eq!(
                t.count(*enc, &text),
                bpe.encode_ordinary(&text).len() as u64,
                "{} on {:?}…",
                enc.name(),
                &text.chars().take(40).collect::<String>()
            );
        }
    }
}
