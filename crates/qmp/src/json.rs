//! JSON the way QEMU reads and writes it on a monitor.
//!
//! - [`Splitter`] cuts a byte stream into JSON texts as QEMU's JSON
//!   streamer does: a text ends when its braces and brackets balance, so
//!   texts need no newline between them and may span lines.
//! - [`to_string`] writes a value as QEMU does: `", "` and `": "`
//!   separators, non-ASCII as `\uXXXX`, and object members in the order of
//!   QEMU's `QDict` (by hash bucket), so that our output is byte-for-byte
//!   QEMU's for the same value.

use serde_json::Value;

/// Largest text [`Splitter`] accepts (QEMU's limit on a token).
pub const MAX_TEXT: usize = 64 << 20;
/// Deepest nesting [`Splitter`] accepts (QEMU's limit).
pub const MAX_NESTING: usize = 1024;

/// One piece of input cut out by [`Splitter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// A complete JSON text (not yet parsed).
    Text(Vec<u8>),
    /// Input that cannot become a JSON text; the splitter has started over
    /// after it.
    Error(&'static str),
}

/// Cuts a byte stream into JSON texts (see the module documentation).
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    /// Inside a string: its quote (QEMU takes `'` as well as `"`).
    in_string: Option<u8>,
    escaped: bool,
    /// Inside a bare scalar (number or keyword) at the top level.
    in_scalar: bool,
}

impl Splitter {
    /// An empty splitter.
    pub fn new() -> Splitter {
        Splitter::default()
    }

    /// Feeds `input`; appends every piece it completes to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Piece>) {
        for &b in input {
            self.byte(b, out);
        }
    }

    /// Ends the input: whatever is pending becomes an error (or, for a
    /// bare scalar, a text).
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        if self.in_scalar {
            self.emit(out);
        } else if !self.buf.is_empty() {
            self.reset();
            out.push(Piece::Error("JSON parse error, premature end of input"));
        }
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.depth = 0;
        self.in_string = None;
        self.escaped = false;
        self.in_scalar = false;
    }

    fn emit(&mut self, out: &mut Vec<Piece>) {
        out.push(Piece::Text(std::mem::take(&mut self.buf)));
        self.reset();
    }

    fn byte(&mut self, b: u8, out: &mut Vec<Piece>) {
        // 0xff never occurs in UTF-8: QEMU's clients send it to resync.
        if b == 0xff {
            self.reset();
            return;
        }
        if self.buf.len() >= MAX_TEXT {
            self.reset();
            out.push(Piece::Error("JSON token size limit exceeded"));
            return;
        }
        if let Some(quote) = self.in_string {
            self.buf.push(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == quote {
                self.in_string = None;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            return;
        }
        if self.in_scalar {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.') {
                self.buf.push(b);
                return;
            }
            self.emit(out);
        }
        match b {
            b' ' | b'\t' | b'\r' | b'\n' if self.depth == 0 => {}
            b'"' | b'\'' => {
                self.in_string = Some(b);
                self.buf.push(b);
            }
            b'{' | b'[' => {
                if self.depth >= MAX_NESTING {
                    self.reset();
                    out.push(Piece::Error("JSON nesting depth limit exceeded"));
                    return;
                }
                self.depth += 1;
                self.buf.push(b);
            }
            b'}' | b']' => {
                self.buf.push(b);
                if self.depth == 0 {
                    self.emit(out);
                    return;
                }
                self.depth -= 1;
                if self.depth == 0 {
                    self.emit(out);
                }
            }
            _ if self.depth == 0 => {
                self.in_scalar = true;
                self.buf.push(b);
            }
            _ => self.buf.push(b),
        }
    }
}

/// `text` with single-quoted strings (which QEMU's parser takes) turned
/// into standard double-quoted ones, for a standard JSON parser.
pub fn requote(text: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !text.contains(&b'\'') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    let mut quote = None;
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        match quote {
            None => {
                if b == b'"' || b == b'\'' {
                    quote = Some(b);
                    out.push(b'"');
                } else {
                    out.push(b);
                }
            }
            Some(q) => {
                if b == b'\\' && i + 1 < text.len() {
                    let next = text[i + 1];
                    if next == b'\'' {
                        out.push(b'\'');
                    } else {
                        out.extend_from_slice(&[b, next]);
                    }
                    i += 2;
                    continue;
                }
                if b == q {
                    quote = None;
                    out.push(b'"');
                } else if b == b'"' {
                    out.extend_from_slice(b"\\\"");
                } else {
                    out.push(b);
                }
            }
        }
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// Writes `value` as QEMU writes JSON on a monitor (see the module
/// documentation).
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, &mut out);
    out
}

fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&format_double(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by_key(|k| qdict_bucket(k));
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(key, out);
                out.push_str(": ");
                write_value(&map[key.as_str()], out);
            }
            out.push('}');
        }
    }
}

/// A double as C's `%.17g` writes it (QEMU's format).
fn format_double(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    if !x.is_finite() {
        // QEMU cannot write these either; JSON has no spelling for them.
        return "null".into();
    }
    let sci = format!("{x:.16e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s.to_owned()
        }
    };
    if !(-4..17).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", trim(mantissa), exp.abs())
    } else {
        trim(&format!("{x:.*}", (16 - exp) as usize))
    }
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04X}"));
                }
            }
        }
    }
    out.push('"');
}

/// The bucket QEMU's `QDict` puts `key` in; QEMU writes members bucket by
/// bucket. (Within a bucket QEMU writes the newest member first; keys that
/// share a bucket are rare and are written here in name order.)
fn qdict_bucket(key: &str) -> (u32, &str) {
    const BUCKETS: u32 = 512;
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i as u32 * 5) % 24));
    }
    let hash = 1_103_515_243u32.wrapping_mul(value).wrapping_add(12345);
    (hash % BUCKETS, key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn split(chunks: &[&[u8]]) -> Vec<Piece> {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    fn text(s: &str) -> Piece {
        Piece::Text(s.as_bytes().to_vec())
    }

    #[test]
    fn texts_need_no_newlines_and_may_span_chunks() {
        assert_eq!(
            split(&[b"{\"a\": \"}{\\\"\"}{\"b\"", b":\n [1, {}]}  \n"]),
            vec![text("{\"a\": \"}{\\\"\"}"), text("{\"b\":\n [1, {}]}")]
        );
        assert_eq!(
            split(&[b"1 \"x\" true{}"]),
            vec![text("1"), text("\"x\""), text("true"), text("{}")]
        );
        assert_eq!(split(&[b"}"]), vec![text("}")]);
        assert_eq!(
            split(&[b"{\"a\"", b"\xff{}"]),
            vec![text("{}")],
            "0xff starts over"
        );
        assert_eq!(
            split(&[b"{\"a\": 1"]),
            vec![Piece::Error("JSON parse error, premature end of input")]
        );
    }

    #[test]
    fn nesting_is_limited() {
        let deep = "[".repeat(MAX_NESTING + 1);
        let out = split(&[deep.as_bytes()]);
        assert_eq!(out[0], Piece::Error("JSON nesting depth limit exceeded"));
    }

    #[test]
    fn writes_like_qemu() {
        // QEMU 10.0's greeting, as qemu-storage-daemon sends it.
        let greeting = json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
            "package": "x"}, "capabilities": ["oob"]}});
        assert_eq!(
            to_string(&greeting),
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": "x"}, "capabilities": ["oob"]}}"#
        );
        assert_eq!(
            to_string(&json!("é\n\u{1F600}")),
            r#""\u00E9\n\uD83D\uDE00""#
        );
        // Doubles as %.17g (values from qemu-storage-daemon 10.0).
        for (v, qemu) in [
            (0.1, "0.10000000000000001"),
            (1.0, "1"),
            (1e3, "1000"),
            (1e300, "1.0000000000000001e+300"),
            (2.5e-7, "2.4999999999999999e-07"),
            (1e20, "1e+20"),
            (-0.0, "-0"),
            (-9223372036854775809.0, "-9.2233720368547758e+18"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
        ] {
            assert_eq!(to_string(&json!(v)), qemu);
        }
    }

    #[test]
    fn single_quotes_as_qemu_takes_them() {
        let pieces = split(&[br#"{'execute': 'q\'x"', "id": "it's"}"#]);
        let Piece::Text(t) = &pieces[0] else {
            panic!("{pieces:?}")
        };
        let v: Value = serde_json::from_slice(&requote(t)).unwrap();
        assert_eq!(v, json!({"execute": "q'x\"", "id": "it's"}));
    }

    proptest::proptest! {
        #[test]
        fn splitting_never_loses_a_text(values in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::strategy::Just(json!({})),
                "[a-z{}\\[\\]\"]{0,8}".prop_map(|s| json!({"execute": s})),
                proptest::num::u32::ANY.prop_map(|n| json!([n, {"k": [n]}])),
            ], 1..6),
            cut in 0usize..200,
        ) {
            let input: String = values.iter().map(to_string).collect::<Vec<_>>().join("\n");
            let cut = cut.min(input.len());
            let pieces = split(&[&input.as_bytes()[..cut], &input.as_bytes()[cut..]]);
            let parsed: Vec<Value> = pieces.iter().map(|p| match p {
                Piece::Text(t) => serde_json::from_slice(t).unwrap(),
                Piece::Error(e) => panic!("{e}"),
            }).collect();
            prop_assert_eq!(parsed, values);
        }
    }
}
