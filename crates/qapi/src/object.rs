//! [`Object`]: QEMU's QObject input visitor, for one JSON object.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One JSON object being read member by member, the way QEMU's QAPI input
/// visitor reads command arguments.
///
/// Callers take members in schema order, so the first problem reported is
/// the one QEMU reports; [`finish`](Self::finish) then complains about any
/// member nobody took. Names in errors are dotted paths from the root
/// (`file.cache.direct`, `bitmaps[1]`).
///
/// With `keyval` set (input from [`crate::keyval::parse`]) scalars arrive as
/// strings and are converted to the type asked for, with QEMU's key=value
/// error texts.
#[derive(Debug, Clone)]
pub struct Object {
    map: Map<String, Value>,
    prefix: String,
    keyval: bool,
}

impl Object {
    /// Reads `value`, which must be an object, as JSON input (QMP).
    pub fn json(value: &Value) -> Result<Object> {
        Object::nested(value, "", false)
    }

    /// Reads `value`, which must be an object, as key=value input.
    pub fn keyval(value: &Value) -> Result<Object> {
        Object::nested(value, "", true)
    }

    /// Reads `value` as the member whose dotted name is `prefix` (empty
    /// for the root).
    pub fn nested(value: &Value, prefix: &str, keyval: bool) -> Result<Object> {
        match value {
            Value::Object(map) => Ok(Object {
                map: map.clone(),
                prefix: if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}.")
                },
                keyval,
            }),
            _ => Err(Error::InvalidParameterType {
                name: if prefix.is_empty() {
                    "null".into()
                } else {
                    prefix.to_owned()
                },
                expected: "object",
            }),
        }
    }

    /// Whether scalars are read from key=value strings.
    pub fn is_keyval(&self) -> bool {
        self.keyval
    }

    /// The dotted name of member `key`, for error messages.
    pub fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// QEMU's "Invalid parameter type" error for member `key`.
    pub fn type_error(&self, key: &str, expected: &'static str) -> Error {
        Error::InvalidParameterType {
            name: self.name(key),
            expected,
        }
    }

    /// QEMU's "Parameter … is missing" error for member `key`.
    pub fn missing(&self, key: &str) -> Error {
        Error::MissingParameter(self.name(key))
    }

    /// Whether member `key` is present (and not taken yet).
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Member `key` as it is, left in place.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// Takes member `key` as it is, without checking its type.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// Takes a required member as it is.
    pub fn req(&mut self, key: &str) -> Result<Value> {
        self.take(key).ok_or_else(|| self.missing(key))
    }

    /// An optional `str` member.
    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.type_error(key, "string")),
        }
    }

    /// A required `str` member.
    pub fn req_str(&mut self, key: &str) -> Result<String> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional `bool` member (`on`/`off`, `yes`/`no`, `true`/`false`,
    /// `y`/`n` in key=value input).
    pub fn opt_bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if self.keyval => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(Some(true)),
                "off" | "no" | "false" | "n" => Ok(Some(false)),
                _ => Err(Error::ParameterRange {
                    name: self.name(key),
                    expected: "'on' or 'off'",
                }),
            },
            Some(_) => Err(self.type_error(key, "boolean")),
        }
    }

    /// A required `bool` member.
    pub fn req_bool(&mut self, key: &str) -> Result<bool> {
        self.opt_bool(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional `uint64` member. Negative numbers are refused (QEMU
    /// wraps them; nothing useful comes of that).
    pub fn opt_u64(&mut self, key: &str) -> Result<Option<u64>> {
        self.opt_unsigned(key, "uint64", u64::MAX)
    }

    /// An optional `uint32` member.
    pub fn opt_u32(&mut self, key: &str) -> Result<Option<u32>> {
        let v = self.opt_unsigned(key, "uint32_t", u32::MAX.into())?;
        Ok(v.and_then(|v| u32::try_from(v).ok()))
    }

    /// An optional `uint16` member.
    pub fn opt_u16(&mut self, key: &str) -> Result<Option<u16>> {
        let v = self.opt_unsigned(key, "uint16_t", u16::MAX.into())?;
        Ok(v.and_then(|v| u16::try_from(v).ok()))
    }

    /// An optional `size` member: a `uint64` in JSON, a number with an
    /// optional `k`/`M`/`G`/`T`/`P`/`E` suffix in key=value input.
    pub fn opt_size(&mut self, key: &str) -> Result<Option<u64>> {
        if self.keyval {
            return match self.map.remove(key) {
                None => Ok(None),
                Some(Value::String(s)) => parse_size(&s).map(Some).ok_or(Error::ParameterRange {
                    name: self.name(key),
                    expected: "size",
                }),
                Some(_) => Err(self.type_error(key, "size")),
            };
        }
        self.opt_u64(key)
    }

    /// A required `size` member.
    pub fn req_size(&mut self, key: &str) -> Result<u64> {
        self.opt_size(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional `int` member.
    pub fn opt_i64(&mut self, key: &str) -> Result<Option<i64>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.type_error(key, "integer")),
            Some(Value::String(s)) if self.keyval => {
                let parsed = match s.strip_prefix('-') {
                    Some(rest) => parse_c_integer(rest)
                        .and_then(|v| i64::try_from(v).ok())
                        .map(|v| -v),
                    None => parse_c_integer(&s).and_then(|v| i64::try_from(v).ok()),
                };
                parsed.map(Some).ok_or(Error::ParameterRange {
                    name: self.name(key),
                    expected: "integer",
                })
            }
            Some(_) => Err(self.type_error(key, "integer")),
        }
    }

    /// QEMU's unsigned rules: JSON numbers go through `uint64` (negative
    /// ones wrap, as in QEMU) and are then range-checked; anything else
    /// "expects uint64". Key=value strings are C integers.
    /// A required `int` member.
    pub fn req_i64(&mut self, key: &str) -> Result<i64> {
        self.opt_i64(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_unsigned(&mut self, key: &str, expected: &'static str, max: u64) -> Result<Option<u64>> {
        let range = |o: &Object, expected| Error::ParameterRange {
            name: o.name(key),
            expected,
        };
        let v = match self.map.remove(key) {
            None => return Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(v), _) => v,
                (None, Some(v)) => v as u64,
                _ => return Err(range(self, "uint64")),
            },
            Some(Value::String(s)) if self.keyval => {
                match parse_c_integer(&s).filter(|v| *v <= max) {
                    Some(v) => return Ok(Some(v)),
                    None => return Err(range(self, "integer")),
                }
            }
            Some(_) => return Err(range(self, "uint64")),
        };
        if v > max {
            return Err(range(self, expected));
        }
        Ok(Some(v))
    }

    /// An optional enum member: one of `values` by name.
    pub fn opt_enum<T: Copy>(&mut self, key: &str, values: &[(&str, T)]) -> Result<Option<T>> {
        let Some(s) = self.opt_str(key)? else {
            return Ok(None);
        };
        values
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(_, v)| Some(v))
            // QEMU's input visitor names a bad enum value by the member's
            // own name, not its path ('aio', not 'file.aio').
            .ok_or_else(|| Error::InvalidValue {
                name: key.to_owned(),
                value: s,
            })
    }

    /// A required enum member.
    pub fn req_enum<T: Copy>(&mut self, key: &str, values: &[(&str, T)]) -> Result<T> {
        self.opt_enum(key, values)?.ok_or_else(|| self.missing(key))
    }

    /// An optional object member, to be read in turn.
    pub fn opt_object(&mut self, key: &str) -> Result<Option<Object>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => {
                Object::nested(&v, &self.name(key), self.keyval).map(Some)
            }
            Some(_) => Err(self.type_error(key, "object")),
        }
    }

    /// A required object member.
    pub fn req_object(&mut self, key: &str) -> Result<Object> {
        self.opt_object(key)?.ok_or_else(|| self.missing(key))
    }

    /// An optional list member: its elements, each with its name for error
    /// messages (`key[0]`, `key[1]`, …).
    pub fn opt_list(&mut self, key: &str) -> Result<Option<Vec<(String, Value)>>> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (format!("{}[{i}]", self.name(key)), v))
                    .collect(),
            )),
            Some(_) => Err(self.type_error(key, "array")),
        }
    }

    /// An optional list of strings.
    pub fn opt_str_list(&mut self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(items) = self.opt_list(key)? else {
            return Ok(None);
        };
        items
            .into_iter()
            .map(|(name, v)| match v {
                Value::String(s) => Ok(s),
                _ => Err(Error::InvalidParameterType {
                    name,
                    expected: "string",
                }),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Takes every member not taken yet (for types whose members are
    /// read elsewhere, like QOM properties).
    pub fn take_rest(&mut self) -> Map<String, Value> {
        std::mem::take(&mut self.map)
    }

    /// Ends reading: fails with "Parameter '…' is unexpected" for the first
    /// member nobody took.
    pub fn finish(self) -> Result<()> {
        self.check_done()
    }

    /// [`finish`](Self::finish) without giving the reader up.
    pub fn check_done(&self) -> Result<()> {
        match self.map.keys().next() {
            Some(key) => Err(Error::UnexpectedParameter(self.name(key))),
            None => Ok(()),
        }
    }
}

/// Parses an unsigned integer as C's `strtoull(s, NULL, 0)` does when all
/// of `s` must be consumed: decimal, `0x` hexadecimal or `0` octal.
fn parse_c_integer(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// Parses a size as QEMU's key=value syntax writes it: a number with an
/// optional `k`/`M`/`G`/`T`/`P`/`E` suffix (powers of 1024), or `b`/`B`
/// for bytes. `None` when it is not one or overflows.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_in_order_then_leftovers() {
        let mut o = Object::json(&json!({"a": "x", "b": true, "c": 7, "d": {"e": 1}})).unwrap();
        assert_eq!(o.req_str("a").unwrap(), "x");
        assert_eq!(o.opt_bool("b").unwrap(), Some(true));
        assert_eq!(o.opt_u64("c").unwrap(), Some(7));
        let mut d = o.req_object("d").unwrap();
        assert_eq!(
            d.opt_str("e").unwrap_err().to_string(),
            "Invalid parameter type for 'd.e', expected: string"
        );
        o.finish().unwrap();
        let mut o = Object::json(&json!({"z": 1})).unwrap();
        assert_eq!(
            o.req_str("a").unwrap_err().to_string(),
            "Parameter 'a' is missing"
        );
        assert_eq!(
            o.finish().unwrap_err().to_string(),
            "Parameter 'z' is unexpected"
        );
    }

    #[test]
    fn integer_rules() {
        let v = json!({"u": -1, "s": "1", "w": 4294967296u64, "i": 1.5});
        let mut o = Object::json(&v).unwrap();
        assert_eq!(
            o.opt_u64("u").unwrap(),
            Some(u64::MAX),
            "negatives wrap, as in QEMU"
        );
        assert_eq!(
            o.opt_u64("s").unwrap_err().to_string(),
            "Parameter 's' expects uint64"
        );
        assert_eq!(
            o.opt_u32("w").unwrap_err().to_string(),
            "Parameter 'w' expects uint32_t"
        );
        assert_eq!(
            o.opt_i64("i").unwrap_err().to_string(),
            "Invalid parameter type for 'i', expected: integer"
        );
        let v = json!({"a": "0x10", "b": "010", "c": "1G", "d": "x", "e": "-5", "f": "maybe"});
        let mut o = Object::keyval(&v).unwrap();
        assert_eq!(o.opt_u64("a").unwrap(), Some(16));
        assert_eq!(o.opt_u64("b").unwrap(), Some(8));
        assert_eq!(o.opt_size("c").unwrap(), Some(1 << 30));
        assert_eq!(
            o.opt_size("d").unwrap_err().to_string(),
            "Parameter 'd' expects size"
        );
        assert_eq!(o.opt_i64("e").unwrap(), Some(-5));
        assert_eq!(
            o.opt_bool("f").unwrap_err().to_string(),
            "Parameter 'f' expects 'on' or 'off'"
        );
    }

    #[test]
    fn lists_and_enums() {
        let v = json!({"l": ["a", 1], "e": "up"});
        let mut o = Object::json(&v).unwrap();
        assert_eq!(
            o.clone().opt_str_list("l").unwrap_err().to_string(),
            "Invalid parameter type for 'l[1]', expected: string"
        );
        assert_eq!(
            o.opt_enum("e", &[("down", 0)]).unwrap_err().to_string(),
            "Parameter 'e' does not accept value 'up'"
        );
        assert_eq!(
            Object::json(&json!([])).unwrap_err().to_string(),
            "Invalid parameter type for 'null', expected: object"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size(""), None);
    }
}
