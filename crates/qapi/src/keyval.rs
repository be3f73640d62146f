//! QEMU's `key=value,…` syntax, as the command line writes options
//! (`--blockdev driver=file,node-name=f0,filename=x.img`).
//!
//! The input stands for a JSON object whose scalars are all strings:
//!
//! - `a.b=v` is member `b` of object member `a`; a fragment of decimal
//!   digits is a list index (`bitmaps.0=x,bitmaps.1=y` is a list); indexes
//!   may come in any order but must not leave gaps;
//! - a value runs to the next single `,`; `,,` stands for a comma;
//! - the first item may leave out its key when the caller names an
//!   *implied key* (`--export nbd,id=e0` is `type=nbd,id=e0`);
//! - key fragments are QAPI names (a letter, then letters, digits, `-` and
//!   `_`) or indexes, 1 to 127 bytes; the last of repeated keys wins.
//!
//! Errors are QEMU's, word for word.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Longest key fragment QEMU accepts, plus one.
const MAX_FRAGMENT: usize = 128;

/// Parses `params` into the JSON object it stands for. `implied_key`, if
/// given, is the key of a first item written without one.
pub fn parse(params: &str, implied_key: Option<&str>) -> Result<Value> {
    let mut root = Map::new();
    let mut rest = params;
    let mut implied = implied_key;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied)?;
        implied = None;
    }
    listify(Value::Object(root), "")
}

/// Parses one item off the front of `params` into `root`; the rest.
fn parse_one<'a>(
    root: &mut Map<String, Value>,
    params: &'a str,
    implied: Option<&str>,
) -> Result<&'a str> {
    let key_len = params.find(['=', ',']).unwrap_or(params.len());
    let (key, after_key, implied_used) = match implied {
        Some(k) if key_len > 0 && !params[key_len..].starts_with('=') => (k, params, true),
        _ => (&params[..key_len], &params[key_len..], false),
    };
    let fragments = fragments(key)?;
    let value_start = if implied_used {
        after_key
    } else {
        after_key
            .strip_prefix('=')
            .ok_or_else(|| Error::KeyvalExpectedEquals(key.to_owned()))?
    };
    let (value, rest) = take_value(value_start);

    // Walk down, creating objects, to the leaf's parent.
    let mut cur = root;
    let mut path = String::new();
    let Some((leaf, inner)) = fragments.split_last() else {
        return Err(Error::KeyvalInvalidKey(key.to_owned()));
    };
    for fragment in inner {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(fragment);
        let slot = cur
            .entry(fragment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match slot {
            Value::Object(map) => map,
            _ => return Err(Error::KeyvalInconsistent(format!("{path}.*"))),
        };
    }
    match cur.get(*leaf) {
        Some(Value::Object(_)) => Err(Error::KeyvalInconsistent(format!("{key}.*"))),
        _ => {
            cur.insert(leaf.to_string(), Value::String(value));
            Ok(rest)
        }
    }
}

/// Splits and checks a dotted key.
fn fragments(key: &str) -> Result<Vec<&str>> {
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let valid = if i > 0 && is_index(part) {
            true
        } else {
            is_qapi_name(part)
        };
        if !valid {
            return Err(Error::KeyvalInvalidKey(key.to_owned()));
        }
        if part.len() >= MAX_FRAGMENT {
            return Err(Error::KeyvalKeyTooLong {
                key: (*part).to_owned(),
                fragment: parts.len() > 1,
            });
        }
    }
    Ok(parts)
}

fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// QAPI's rule for names: a letter, then letters, digits, `-` and `_`.
fn is_qapi_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A value up to the next single comma (`,,` is a comma); the value and
/// what follows that comma.
fn take_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = s;
    loop {
        match rest.find(',') {
            None => {
                value.push_str(rest);
                return (value, "");
            }
            Some(i) => {
                value.push_str(&rest[..i]);
                if rest[i + 1..].starts_with(',') {
                    value.push(',');
                    rest = &rest[i + 2..];
                } else {
                    return (value, &rest[i + 1..]);
                }
            }
        }
    }
}

/// Turns objects whose keys are all indexes into lists, depth first.
/// `path` is the dotted key of `value` plus a trailing dot (empty at the
/// root).
fn listify(value: Value, path: &str) -> Result<Value> {
    let Value::Object(map) = value else {
        return Ok(value);
    };
    let mut out = Map::new();
    let (mut has_index, mut has_member) = (false, false);
    for (key, v) in map {
        if is_index(&key) {
            has_index = true;
        } else {
            has_member = true;
        }
        let child = listify(v, &format!("{path}{key}."))?;
        out.insert(key, child);
    }
    if has_index && has_member {
        return Err(Error::KeyvalInconsistent(format!("{path}*")));
    }
    if !has_index {
        return Ok(Value::Object(out));
    }
    let mut items: Vec<(u64, Value)> = out
        .into_iter()
        .map(|(k, v)| (k.parse().unwrap_or(u64::MAX), v))
        .collect();
    items.sort_by_key(|(i, _)| *i);
    let mut list = Vec::with_capacity(items.len());
    for (expected, (index, v)) in items.into_iter().enumerate() {
        if index != expected as u64 {
            return Err(Error::KeyvalMissingIndex(format!("{path}{expected}")));
        }
        list.push(v);
    }
    Ok(Value::Array(list))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(s: &str, implied: Option<&str>) -> Value {
        parse(s, implied).unwrap()
    }

    fn err(s: &str, implied: Option<&str>) -> String {
        parse(s, implied).unwrap_err().to_string()
    }

    #[test]
    fn objects_lists_and_implied_keys() {
        assert_eq!(ok("", None), json!({}));
        assert_eq!(
            ok(
                "driver=qcow2,node-name=n,file.driver=file,file.filename=x.qcow2",
                None
            ),
            json!({"driver": "qcow2", "node-name": "n",
                   "file": {"driver": "file", "filename": "x.qcow2"}})
        );
        assert_eq!(
            ok("nbd,id=e0,bitmaps.1=b,bitmaps.0=a", Some("type")),
            json!({"type": "nbd", "id": "e0", "bitmaps": ["a", "b"]})
        );
        assert_eq!(ok("a=1,a=2,", None), json!({"a": "2"}));
        assert_eq!(
            ok("l.0.x=1,l.1.x=2", None),
            json!({"l": [{"x": "1"}, {"x": "2"}]})
        );
        // An implied key only applies to a first item without '='.
        assert_eq!(ok("id=x", Some("type")), json!({"id": "x"}));
        let many: String = (0..12).map(|i| format!("l.{i}={i},")).collect();
        assert_eq!(ok(&many, None)["l"][11], json!("11"));
    }

    #[test]
    fn commas_escape() {
        assert_eq!(
            ok("filename=a,,b,x=1", None),
            json!({"filename": "a,b", "x": "1"})
        );
        assert_eq!(ok("a=,,,,", None), json!({"a": ",,"}));
        assert_eq!(
            ok("null-co,,x", Some("driver")),
            json!({"driver": "null-co,x"})
        );
    }

    #[test]
    fn errors_are_qemus() {
        assert_eq!(err("a", None), "Expected '=' after parameter 'a'");
        assert_eq!(err("a,b=1", None), "Expected '=' after parameter 'a'");
        assert_eq!(err("=1", None), "Invalid parameter ''");
        assert_eq!(err("1a=1", None), "Invalid parameter '1a'");
        assert_eq!(err("a..b=1", None), "Invalid parameter 'a..b'");
        assert_eq!(
            err("a=1,a.b=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.b=2,a=1", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(
            err("a.0=1,a.b=2", None),
            "Parameters 'a.*' used inconsistently"
        );
        assert_eq!(err("a.1=x", None), "Parameter 'a.0' missing");
        assert_eq!(err("a.0=x,a.2=y", None), "Parameter 'a.1' missing");
        let long = "k".repeat(128);
        assert_eq!(
            err(&format!("{long}=1"), None),
            format!("Parameter '{long}' is too long")
        );
        assert_eq!(
            err(&format!("a.{long}=1"), None),
            format!("Parameter fragment '{long}' is too long")
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "[a-c0-2.=,]{0,24}", implied in proptest::option::of("[a-c]{1,2}")) {
            let _ = parse(&s, implied.as_deref());
        }

        #[test]
        fn escaped_values_round_trip(v in "[ -~]{0,20}") {
            let escaped = v.replace(',', ",,");
            let parsed = parse(&format!("k={escaped}"), None).unwrap();
            proptest::prop_assert_eq!(parsed, json!({"k": v}));
        }
    }
}
