use super::*;
use crate::config::prices::PriceSource;

fn price(input_per_m: f64, output_per_m: f64, cached_per_m: f64) -> Price {
    Price {
        input: input_per_m / 1e6,
        output: output_per_m / 1e6,
        cached_input: cached_per_m / 1e6,
        cache_write: input_per_m * 1.25 / 1e6,
        cache_write_1h: input_per_m * 2.0 / 1e6,
        long_context: None,
        source: PriceSource::Catalog,
    }
}

#[test]
fn reads_openai_usage_with_cached_and_reasoning_tokens() {
    let u = usage_of(br#"{"id":"x","usage":{"prompt_tokens":1000,"completion_tokens":200,"prompt_tokens_details":{"cached_tokens":600},"completion_tokens_details":{"reasoning_tokens":50}}}"#).unwrap();
    assert_eq!(
        (u.prompt, u.completion, u.cached, u.reasoning),
        (1000, 200, 600, 50)
    );
    assert_eq!(u.source, TokenSource::Upstream);
}

#[test]
fn reads_anthropic_usage() {
    let u = usage_of(br#"{"usage":{"input_tokens":100,"output_tokens":20,"cache_read_input_tokens":300,"cache_creation_input_tokens":50}}"#).unwrap();
    assert_eq!(
        (u.prompt, u.completion, u.cached, u.cache_write),
        (450, 20, 300, 50)
    );
}

#[test]
fn anthropic_cache_writes_are_priced_by_their_ttl() {
    // claude-haiku-4-5: $1 in, $5 out, $0.10 read, $1.25 5-minute write, $2 1-hour write.
    let u = usage_of(br#"{"usage":{"input_tokens":100,"output_tokens":20,"cache_read_input_tokens":300,"cache_creation_input_tokens":50,"cache_creation":{"ephemeral_5m_input_tokens":20,"ephemeral_1h_input_tokens":30}}}"#).unwrap();
    assert_eq!((u.prompt, u.cache_write, u.cache_write_1h), (450, 50, 30));
    // (100 x 1 + 300 x 0.10 + 20 x 1.25 + 30 x 2 + 20 x 5) $/1M = 315 µ$.
    assert_eq!(
        cost_nusd(Some(&price(1.0, 5.0, 0.10)), &u, 0, None),
        315_000
    );
    // A 1-hour count larger than the writes it is part of is held to them.
    let u = usage_of(br#"{"usage":{"input_tokens":0,"output_tokens":1,"cache_creation_input_tokens":10,"cache_creation":{"ephemeral_1h_input_tokens":99}}}"#).unwrap();
    assert_eq!((u.cache_write, u.cache_write_1h), (10, 10));
}

#[test]
fn counts_no_request_can_have_are_not_trusted() {
    let max = MAX_REPORTED_TOKENS;
    let ok = format!(r#"{{"usage":{{"prompt_tokens":{max},"completion_tokens":1}}}}"#);
    assert_eq!(usage_of(ok.as_bytes()).unwrap().prompt, max);
    for usage in [
        r#"{"prompt_tokens":18446744073709551615,"completion_tokens":16}"#,
        r#"{"prompt_tokens":10,"completion_tokens":4294967296}"#,
        r#"{"input_tokens":1,"output_tokens":1,"cache_read_input_tokens":18446744073709551615}"#,
        r#"{"prompt_tokens":10,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":18446744073709551615}}"#,
    ] {
        assert_eq!(
            usage_of(format!(r#"{{"usage":{usage}}}"#).as_bytes()),
            None,
            "{usage}"
        );
    }
    assert_eq!(
        timings_json(br#"{"prompt_n":18446744073709551615,"cache_n":1,"predicted_n":1}"#),
        None
    );
}

#[test]
fn missing_null_or_malformed_usage_is_unknown_not_zero() {
    assert_eq!(usage_of(br#"{"choices":[]}"#), None);
    assert_eq!(usage_of(br#"{"usage":null}"#), None);
    assert_eq!(usage_of(br#"{"usage":{"prompt_tokens":"many"}}"#), None);
    assert_eq!(usage_of(br#"{"usage":{"completion_tokens":5}}"#), None);
    assert_eq!(usage_of(b"not json"), None);
}

#[test]
fn cost_prices_cached_tokens_at_their_own_rate() {
    // gpt-4o-mini: $0.15 in, $0.60 out, $0.075 cached per 1M tokens.
    let p = price(0.15, 0.60, 0.075);
    let u = Usage {
        prompt: 1000,
        completion: 200,
        cached: 600,
        cache_write: 0,
        cache_write_1h: 0,
        reasoning: 0,
        source: TokenSource::Upstream,
    };
    // 400 x 0.15 + 600 x 0.075 + 200 x 0.60 = 60 + 45 + 120 = 225 micro-dollars per 1M... per token units:
    assert_eq!(cost_nusd(Some(&p), &u, 0, None), 225_000);
    assert_eq!(format_usd(225_000), "0.000225000");
}

#[test]
fn long_context_tier_applies_to_the_whole_request() {
    let mut p = price(1.25, 10.0, 0.125);
    p.long_context = Some((200_000, Box::new(price(2.5, 15.0, 0.25))));
    let small = Usage {
        prompt: 200_000,
        completion: 0,
        cached: 0,
        cache_write: 0,
        cache_write_1h: 0,
        reasoning: 0,
        source: TokenSource::Local,
    };
    let large = Usage {
        prompt: 200_001,
        ..small
    };
    assert_eq!(cost_nusd(Some(&p), &small, 0, None), 250_000_000);
    assert_eq!(cost_nusd(Some(&p), &large, 0, None), 500_002_500);
}

#[test]
fn egress_is_charged_per_byte_and_unpriced_models_cost_only_egress() {
    let u = Usage {
        prompt: 10,
        completion: 10,
        cached: 0,
        cache_write: 0,
        cache_write_1h: 0,
        reasoning: 0,
        source: TokenSource::Upstream,
    };
    assert_eq!(cost_nusd(None, &u, 1_000_000, Some(0.09)), 90_000);
    assert_eq!(cost_nusd(None, &u, 0, None), 0);
}

#[test]
fn a_whole_answer_decodes_its_text_only_when_its_usage_needs_it() {
    let (u, text) = read_answer(br#"{"choices":[{"message":{"content":"hi"}}]}"#).unwrap();
    assert_eq!(
        (u, text.as_str()),
        (None, "hi"),
        "no usage: the text is counted"
    );
    let (u, text) = read_answer(
        br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":0}}"#,
    )
    .unwrap();
    assert_eq!(
        (u.unwrap().completion, text.as_str()),
        (0, "hi"),
        "a usage to check"
    );
    let (u, text) = read_answer(
        br#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#,
    )
    .unwrap();
    assert_eq!(
        (u.unwrap().completion, text.as_str()),
        (1, ""),
        "usage stands"
    );
    assert_eq!(read_answer(b"{\"choices\": [}"), None);
}
