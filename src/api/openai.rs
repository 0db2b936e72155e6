//! Reads only what routing needs from an OpenAI request body, borrowing from the received
//! bytes; the bytes themselves are forwarded as they are, except for the `model` value when
//! an alias resolves to another name (one splice, one copy).

use crate::error::GatewayError;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::ops::Range;

/// The fields of a request the gateway acts on.
#[derive(Debug)]
pub struct RequestSummary<'a> {
    pub model: Cow<'a, str>,
    /// Byte range of the model's JSON string (quotes included) within the body.
    pub model_span: Range<usize>,
    pub stream: bool,
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    stream: Option<bool>,
}

pub fn parse(body: &[u8]) -> Result<RequestSummary<'_>, GatewayError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(GatewayError::MalformedJson(
            "the body must be a JSON object".into(),
        ));
    }
    let head: Head<'_> = serde_json::from_slice(body).map_err(json_error)?;
    let raw = head.model.ok_or_else(|| GatewayError::InvalidField {
        param: "model",
        message: "you must provide a model parameter".into(),
    })?;
    let model: Cow<'_, str> =
        serde_json::from_str(raw.get()).map_err(|_| GatewayError::InvalidField {
            param: "model",
            message: "`model` must be a string".into(),
        })?;
    if model.is_empty() {
        return Err(GatewayError::InvalidField {
            param: "model",
            message: "`model` must not be empty".into(),
        });
    }
    // `raw` borrows from `body`, so its position is a pointer difference.
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    Ok(RequestSummary {
        model,
        model_span: start..start + raw.get().len(),
        stream: head.stream.unwrap_or(false),
    })
}

fn json_error(e: serde_json::Error) -> GatewayError {
    match e.classify() {
        serde_json::error::Category::Data => GatewayError::InvalidField {
            param: "body",
            message: format!("invalid request: {e}"),
        },
        _ => GatewayError::MalformedJson(e.to_string()),
    }
}

/// The body with its `model` value replaced; the caller only calls this when the name differs.
pub fn with_model(body: &Bytes, span: Range<usize>, model: &str) -> Bytes {
    let quoted = serde_json::to_string(model).unwrap_or_default();
    let mut out = BytesMut::with_capacity(body.len() - span.len() + quoted.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_model_and_stream_and_their_place() {
        let body =
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"chat-small","stream":true}"#;
        let s = parse(body).unwrap();
        assert_eq!(s.model, "chat-small");
        assert!(s.stream);
        assert_eq!(&body[s.model_span.clone()], br#""chat-small""#);
    }

    #[test]
    fn rewrites_only_the_model() {
        let body = Bytes::from_static(br#"{"model":"chat-small","n":1}"#);
        let s = parse(&body).unwrap();
        let out = with_model(&body, s.model_span, "meta-llama/Llama \"3\"");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "meta-llama/Llama \"3\"");
        assert_eq!(v["n"], 1);
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let s = parse(br#"{"model":"a\u002fb"}"#).unwrap();
        assert_eq!(s.model, "a/b");
    }

    #[test]
    fn bad_bodies_are_told_apart() {
        assert!(matches!(
            parse(b"{\"model\":"),
            Err(GatewayError::MalformedJson(_))
        ));
        assert!(matches!(
            parse(b"[1,2]"),
            Err(GatewayError::MalformedJson(_))
        ));
        assert!(matches!(
            parse(b"{}"),
            Err(GatewayError::InvalidField { param: "model", .. })
        ));
        assert!(matches!(
            parse(br#"{"model":7}"#),
            Err(GatewayError::InvalidField { param: "model", .. })
        ));
        assert!(matches!(
            parse(br#"{"model":"m","stream":"yes"}"#),
            Err(GatewayError::InvalidField { param: "body", .. })
        ));
    }
}
