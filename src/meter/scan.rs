//! One pass over an upstream JSON document (a stream chunk or a whole answer) that finds what
//! metering needs without building a tree: the `usage` member, the generated text, whether
//! `choices` is empty, whether it is an error.
//!
//! It is a validating recursive-descent scanner, so its answer is the one a full parse gives
//! on any valid document, whatever the whitespace, key order or escapes (`tests/observer.rs`
//! checks this against `serde_json::Value` on re-serialized real engine streams), and an
//! invalid document is an error, never a guess. Strings are decoded only where they are
//! generated text; everything else is skipped at byte speed.
//!
//! Generated text is the string value at any of these paths (`*` is any array index):
//!
//! ```text
//! choices.*.text                                   completions
//! choices.*.{delta,message}.content                 string, or parts: content.*.text,
//!                                                   content.*.thinking.*.text (Magistral)
//! choices.*.{delta,message}.{reasoning_content,reasoning}
//! choices.*.{delta,message}.tool_calls.*.function.arguments
//! ```
//!
//! A tool call's name is not counted (a few tokens, and engines repeat it on every chunk),
//! nor the legacy `function_call`, which llama-cpp-python sends beside `tool_calls` with the
//! same arguments.

use std::ops::Range;

/// Where a string's plain run ends (at its closing quote or next backslash); invalid when it
/// holds a raw control byte (JSON forbids them inside strings) or never ends.
///
/// Eight bytes at a time, all three searches in one pass: every stream event and answer
/// passes here, as many short keys and values and a few long texts. (A vector search per
/// string, `memchr2` then a control-byte check, cost more in its set-up than the short
/// strings take.)
fn run_end(rest: &[u8]) -> Result<usize, Invalid> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const QUOTE: u64 = ONES * b'"' as u64;
    const BACKSLASH: u64 = ONES * b'\\' as u64;
    const SPACE: u64 = ONES * 0x20;
    let mut at = 0;
    while let Some(word) = rest.get(at..at + 8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(word);
        let x = u64::from_le_bytes(b);
        let (q, s) = (x ^ QUOTE, x ^ BACKSLASH);
        // A byte that is zero (or below 0x20) borrows into its high bit. A borrow can also
        // flag bytes above a true hit, never below one: the lowest flag is always exact.
        // Bytes with the high bit set (UTF-8) are masked out by `!x`.
        let hits = ((q.wrapping_sub(ONES) & !q)
            | (s.wrapping_sub(ONES) & !s)
            | (x.wrapping_sub(SPACE) & !x))
            & HIGH;
        if hits != 0 {
            let i = at + (hits.trailing_zeros() / 8) as usize;
            return if rest[i] < 0x20 { Err(Invalid) } else { Ok(i) };
        }
        at += 8;
    }
    for (i, &c) in rest[at..].iter().enumerate() {
        match c {
            b'"' | b'\\' => return Ok(at + i),
            0..0x20 => return Err(Invalid),
            _ => {}
        }
    }
    Err(Invalid)
}

/// Nesting this deep is refused, as serde_json refuses it, so hostile input cannot exhaust
/// the stack and the two agree on what is valid.
const MAX_DEPTH: usize = 128;

/// What one document says, as far as metering is concerned.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The top-level `usage` member: its value's span (when not `null`), and the bytes to cut
    /// to remove the member with its separating comma.
    pub usage: Option<Range<usize>>,
    pub usage_member: Option<Range<usize>>,
    /// The top-level `timings` object (llama.cpp's server: its own counts, on the last chunk).
    pub timings: Option<Range<usize>>,
    /// The top-level `choices` is `[]`.
    pub choices_empty: bool,
    /// The document has a top-level `error` member that is not `null`.
    pub error: bool,
    /// Non-empty generated-text strings found.
    pub text_parts: u32,
    /// The last non-empty generated-text string, its quotes included.
    pub text_span: Option<Range<usize>>,
}

impl Scan {
    /// The same answer for a document whose bytes from `at` on moved by `by`.
    pub fn shifted(&self, at: usize, by: isize) -> Scan {
        let move_range = |r: &Range<usize>| -> Range<usize> {
            match r.start >= at {
                true => r.start.wrapping_add_signed(by)..r.end.wrapping_add_signed(by),
                false => r.clone(),
            }
        };
        Scan {
            usage: self.usage.as_ref().map(move_range),
            usage_member: self.usage_member.as_ref().map(move_range),
            timings: self.timings.as_ref().map(move_range),
            choices_empty: self.choices_empty,
            error: self.error,
            text_parts: self.text_parts,
            text_span: self.text_span.as_ref().map(move_range),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// Scans `doc`, appending its generated text to `text`. `doc` must be valid UTF-8 JSON.
pub fn scan(doc: &[u8], text: &mut String) -> Result<Scan, Invalid> {
    scan_into(doc, Some(text))
}

/// Checks that `token` is exactly one JSON string (quotes included) and appends its decoded
/// text to `text`: what a document whose only change is that string needs scanned again.
pub fn string_token(token: &[u8], text: &mut String) -> Result<(), Invalid> {
    let mut s = Scanner::new(token, Some(text))?;
    s.string(true)?;
    s.at_end()
}

/// Scans `doc` without decoding its text: validation, usage, and whether there was any.
pub fn scan_only(doc: &[u8]) -> Result<Scan, Invalid> {
    scan_into(doc, None)
}

fn scan_into(doc: &[u8], text: Option<&mut String>) -> Result<Scan, Invalid> {
    let mut s = Scanner::new(doc, text)?;
    s.ws();
    s.value(Path::Root)?;
    s.ws();
    s.at_end()?;
    Ok(s.out)
}

/// Where the scanner is, reduced to the places that matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Root,
    Choices,
    Choice,
    /// `delta` or `message`.
    Message,
    ContentParts,
    ContentPart,
    ToolCalls,
    ToolCall,
    Function,
    /// A string here is generated text.
    Text,
    Usage,
    Timings,
    Error,
    Other,
}

impl Path {
    fn member(self, key: &[u8]) -> Path {
        match (self, key) {
            (Path::Root, b"choices") => Path::Choices,
            (Path::Root, b"usage") => Path::Usage,
            (Path::Root, b"timings") => Path::Timings,
            (Path::Root, b"error") => Path::Error,
            (Path::Choice, b"text") => Path::Text,
            (Path::Choice, b"delta" | b"message") => Path::Message,
            (Path::Message, b"content") => Path::ContentParts,
            (Path::Message, b"reasoning_content" | b"reasoning") => Path::Text,
            (Path::Message, b"tool_calls") => Path::ToolCalls,
            (Path::ContentPart, b"text") => Path::Text,
            (Path::ContentPart, b"thinking") => Path::ContentParts,
            (Path::ToolCall, b"function") => Path::Function,
            (Path::Function, b"arguments") => Path::Text,
            _ => Path::Other,
        }
    }

    fn element(self) -> Path {
        match self {
            Path::Choices => Path::Choice,
            Path::ContentParts => Path::ContentPart,
            Path::ToolCalls => Path::ToolCall,
            _ => Path::Other,
        }
    }

    /// A string at this path is generated text (`content` may be a string or a part list).
    fn is_text(self) -> bool {
        matches!(self, Path::Text | Path::ContentParts)
    }
}

struct Scanner<'a, 't> {
    b: &'a [u8],
    /// The same bytes, known UTF-8: runs between ASCII delimiters are sliced, not re-checked.
    s: &'a str,
    i: usize,
    depth: usize,
    /// Where generated text goes; `None` to only validate it.
    text: Option<&'t mut String>,
    out: Scan,
}

impl<'a, 't> Scanner<'a, 't> {
    fn new(doc: &'a [u8], text: Option<&'t mut String>) -> Result<Self, Invalid> {
        let doc = std::str::from_utf8(doc).map_err(|_| Invalid)?;
        Ok(Scanner {
            b: doc.as_bytes(),
            s: doc,
            i: 0,
            depth: 0,
            text,
            out: Scan::default(),
        })
    }

    /// Nothing may follow what was scanned.
    fn at_end(&self) -> Result<(), Invalid> {
        match self.i == self.b.len() {
            true => Ok(()),
            false => Err(Invalid),
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), Invalid> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(Invalid)
        }
    }

    fn value(&mut self, path: Path) -> Result<(), Invalid> {
        match self.peek().ok_or(Invalid)? {
            b'{' => self.nested(|s| s.object(path)),
            b'[' => self.nested(|s| s.array(path)),
            b'"' => {
                let start = self.i;
                self.string(path.is_text())?;
                // More than its two quotes: a non-empty string.
                if path.is_text() && self.i - start > 2 {
                    self.out.text_parts += 1;
                    self.out.text_span = Some(start..self.i);
                }
                Ok(())
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(Invalid),
        }
    }

    fn nested(&mut self, f: impl FnOnce(&mut Self) -> Result<(), Invalid>) -> Result<(), Invalid> {
        self.depth += 1;
        if self.depth >= MAX_DEPTH {
            return Err(Invalid);
        }
        let r = f(self);
        self.depth -= 1;
        r
    }

    fn object(&mut self, path: Path) -> Result<(), Invalid> {
        self.expect(b'{')?;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        let mut prev_comma: Option<usize> = None;
        loop {
            let key_start = self.i;
            let key = self.key()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            let member = path.member(key);
            let value_start = self.i;
            let is_null = self.peek() == Some(b'n');
            self.value(member)?;
            let value_end = self.i;
            if path == Path::Root {
                self.top_level(
                    member,
                    is_null,
                    value_start..value_end,
                    key_start,
                    prev_comma,
                )?;
            }
            self.ws();
            match self.peek() {
                Some(b',') => {
                    if path == Path::Root && member == Path::Usage {
                        // First member: cut it with the comma that follows.
                        if prev_comma.is_none() {
                            self.out.usage_member = Some(key_start..self.i + 1);
                        }
                    }
                    prev_comma = Some(self.i);
                    self.i += 1;
                    self.ws();
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Invalid),
            }
        }
    }

    fn top_level(
        &mut self,
        member: Path,
        is_null: bool,
        value: Range<usize>,
        key_start: usize,
        prev_comma: Option<usize>,
    ) -> Result<(), Invalid> {
        match member {
            // A second `usage`: parsers disagree on which one counts, and only one could be
            // hidden from a client that did not ask for it.
            Path::Usage if self.out.usage_member.is_some() => return Err(Invalid),
            Path::Usage => {
                self.out.usage = (!is_null).then(|| value.clone());
                self.out.usage_member = Some(prev_comma.unwrap_or(key_start)..value.end);
            }
            Path::Timings => self.out.timings = (!is_null).then_some(value),
            Path::Choices => self.out.choices_empty = is_empty_array(&self.b[value]),
            Path::Error => self.out.error = !is_null,
            _ => {}
        }
        Ok(())
    }

    fn array(&mut self, path: Path) -> Result<(), Invalid> {
        self.expect(b'[')?;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        let element = path.element();
        loop {
            self.value(element)?;
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.ws();
                }
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Invalid),
            }
        }
    }

    /// An object key, raw. Keys we look for have no escapes; an escaped key is compared
    /// decoded, so `"con\u0074ent"` is `content` as a parser sees it.
    fn key(&mut self) -> Result<&'a [u8], Invalid> {
        let b = self.b;
        let start = self.i + 1;
        let escaped = self.string(false)?;
        let raw = &b[start..self.i - 1];
        if !escaped {
            return Ok(raw);
        }
        let decoded: String = serde_json::from_slice(&b[start - 1..self.i]).map_err(|_| Invalid)?;
        Ok(match decoded.as_str() {
            "choices" => b"choices",
            "usage" => b"usage",
            "timings" => b"timings",
            "error" => b"error",
            "text" => b"text",
            "delta" => b"delta",
            "message" => b"message",
            "content" => b"content",
            "reasoning_content" => b"reasoning_content",
            "reasoning" => b"reasoning",
            "tool_calls" => b"tool_calls",
            "function" => b"function",
            "arguments" => b"arguments",
            "thinking" => b"thinking",
            _ => b"",
        })
    }

    /// A string literal; decoded into `text` when `keep` (and text is kept). Returns whether
    /// it had escapes.
    fn string(&mut self, keep: bool) -> Result<bool, Invalid> {
        let keep = keep && self.text.is_some();
        self.expect(b'"')?;
        let mut escaped = false;
        let mut run = self.i;
        loop {
            // Plain bytes go in runs up to the next quote or backslash; a raw control
            // character inside one makes the document invalid.
            self.i += run_end(&self.b[self.i..])?;
            if keep {
                self.push(run, self.i);
            }
            if self.b[self.i] == b'"' {
                self.i += 1;
                return Ok(escaped);
            }
            escaped = true;
            self.i += 1;
            let c = self.escape()?;
            if let (true, Some(text)) = (keep, self.text.as_deref_mut()) {
                text.push(c);
            }
            run = self.i;
        }
    }

    fn push(&mut self, from: usize, to: usize) {
        if let (true, Some(text)) = (to > from, self.text.as_deref_mut()) {
            // On char boundaries: the run lies between ASCII delimiters.
            text.push_str(&self.s[from..to]);
        }
    }

    /// The character of an escape whose backslash was just passed.
    fn escape(&mut self) -> Result<char, Invalid> {
        let c = self.peek().ok_or(Invalid)?;
        self.i += 1;
        Ok(match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = self.hex4()?;
                match hi {
                    0xD800..=0xDBFF => {
                        if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
                            return Err(Invalid); // a lone leading surrogate
                        }
                        self.i += 2;
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return Err(Invalid);
                        }
                        let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                        char::from_u32(cp).ok_or(Invalid)?
                    }
                    0xDC00..=0xDFFF => return Err(Invalid), // a lone trailing surrogate
                    _ => char::from_u32(hi).ok_or(Invalid)?,
                }
            }
            _ => return Err(Invalid),
        })
    }

    fn hex4(&mut self) -> Result<u32, Invalid> {
        let h = self.b.get(self.i..self.i + 4).ok_or(Invalid)?;
        let s = std::str::from_utf8(h).map_err(|_| Invalid)?;
        if !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(Invalid);
        }
        self.i += 4;
        u32::from_str_radix(s, 16).map_err(|_| Invalid)
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Invalid> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Invalid)
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Result<(), Invalid> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(Invalid),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(Invalid);
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(Invalid);
            }
            self.digits();
        }
        Ok(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }
}

fn is_empty_array(v: &[u8]) -> bool {
    v.first() == Some(&b'[')
        && v[1..]
            .iter()
            .all(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(doc: &str) -> (Scan, String) {
        let mut text = String::new();
        let s = scan(doc.as_bytes(), &mut text).expect("valid");
        (s, text)
    }

    #[test]
    fn finds_text_and_usage_with_any_spacing() {
        let (s, text) = run(
            r#"{ "id" : "x", "choices" : [ { "index": 0, "delta" : { "content" : "Hi \"you\"\n" } } ], "usage" : null }"#,
        );
        assert_eq!(text, "Hi \"you\"\n");
        assert_eq!(s.usage, None);
        assert!(s.usage_member.is_some());
        assert_eq!(s.text_parts, 1);
    }

    #[test]
    fn usage_member_cut_leaves_valid_json() {
        for doc in [
            r#"{"a":1,"usage":null}"#,
            r#"{"usage":null,"a":1}"#,
            r#"{"usage": {"prompt_tokens": 1} , "a":1}"#,
            r#"{"a":1 , "usage" : null , "b":2}"#,
            r#"{"usage":null}"#,
        ] {
            let (s, _) = run(doc);
            let cut = s.usage_member.unwrap();
            let mut out = doc.as_bytes()[..cut.start].to_vec();
            out.extend_from_slice(&doc.as_bytes()[cut.end..]);
            let v: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
            assert!(
                v.get("usage").is_none(),
                "{doc} -> {}",
                String::from_utf8_lossy(&out)
            );
        }
    }

    #[test]
    fn decodes_unicode_escapes_and_surrogate_pairs() {
        let (_, text) = run(r#"{"choices":[{"text":"caf\u00e9 \ud83d\ude00 \u4e2d"}]}"#);
        assert_eq!(text, "café 😀 中");
    }

    #[test]
    fn tool_calls_reasoning_and_content_parts_are_text() {
        let (s, text) = run(
            r#"{"choices":[{"delta":{"reasoning_content":"think ","tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}},{"message":{"content":[{"type":"text","text":"A"}],"reasoning":"R"}}]}"#,
        );
        assert_eq!(text, "think {\"a\":1}AR");
        assert_eq!(s.text_parts, 4);
    }

    #[test]
    fn text_keys_elsewhere_are_not_text() {
        let (_, text) = run(
            r#"{"content":"no","choices":[{"logprobs":{"content":[{"token":"x","text":"no"}]},"delta":{"role":"assistant","name":"no"}}]}"#,
        );
        assert_eq!(text, "");
    }

    #[test]
    fn escaped_keys_are_compared_decoded() {
        let (_, text) = run(r#"{"choices":[{"delta":{"con\u0074ent":"yes"}}]}"#);
        assert_eq!(text, "yes");
    }

    #[test]
    fn empty_choices_and_error_are_seen() {
        let (s, _) = run(r#"{"choices": [ ], "usage": {"prompt_tokens": 3}}"#);
        assert!(s.choices_empty);
        assert!(s.usage.is_some());
        let (s, _) = run(r#"{"error": {"message": "boom"}}"#);
        assert!(s.error);
        let (s, _) = run(r#"{"error": null, "choices": []}"#);
        assert!(!s.error);
    }

    #[test]
    fn invalid_documents_are_refused() {
        for doc in [
            "",
            "{",
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00x"}"#,
            "{\"a\":\"raw\nnewline\"}",
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":tru}"#,
            r#"{"a":1} x"#,
            r#"{"a":"\x"}"#,
        ] {
            assert_eq!(
                scan(doc.as_bytes(), &mut String::new()),
                Err(Invalid),
                "{doc:?}"
            );
            assert!(
                serde_json::from_str::<serde_json::Value>(doc).is_err(),
                "{doc:?}"
            );
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert_eq!(scan(deep.as_bytes(), &mut String::new()), Err(Invalid));
        assert_eq!(scan(b"{\"a\":\"\xff\"}", &mut String::new()), Err(Invalid));
    }
}

#[cfg(test)]
mod run_end_tests {
    use super::run_end;

    #[test]
    fn finds_every_quote_backslash_and_control_byte_at_every_place_and_nothing_else() {
        for len in 0..20 {
            let clean: Vec<u8> = (0..len)
                .map(|i| [b'a', 0x7f, 0x20, 0xc3, 0xff, b'!', b'#', b'[', b']'][i % 9])
                .collect();
            assert_eq!(run_end(&clean), Err(super::Invalid), "{clean:?}");
            for at in 0..len {
                for c in [b'"', b'\\'] {
                    let mut end = clean.clone();
                    end[at] = c;
                    // A second end later on must not hide the first.
                    end.push(b'"');
                    assert_eq!(run_end(&end), Ok(at), "{end:?}");
                }
                for c in [0u8, 0x01, 0x0a, 0x1f] {
                    let mut dirty = clean.clone();
                    dirty[at] = c;
                    dirty.push(b'"');
                    assert_eq!(run_end(&dirty), Err(super::Invalid), "{dirty:?}");
                }
            }
        }
    }
}
