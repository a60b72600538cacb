//! List filters (the AIP-160 subset `field = "value"` joined by `AND`) and opaque page tokens
//! (AIP-158): a token carries the position after the last image returned and a fingerprint of
//! the query, so a token used with another filter is refused rather than misread.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::error::{invalid, Result};

/// The fields `ListImages` filters on.
pub const IMAGE_FILTER_FIELDS: &[&str] = &[
    "state",
    "os_type",
    "image_name",
    "tag",
    "project",
    "visibility",
];

/// Parses `filter` into `(field, value)` pairs; `fields` are the ones allowed.
pub fn parse(filter: &str, fields: &[&str]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let f = filter.trim();
    if f.is_empty() {
        return Ok(out);
    }
    for term in f.split(" AND ") {
        let Some((k, v)) = term.split_once('=') else {
            return Err(bad(filter, &format!("{term:?} is not `field = \"value\"`")));
        };
        let k = k.trim();
        let v = v.trim();
        if !fields.contains(&k) {
            return Err(bad(
                filter,
                &format!("unknown field {k:?}; filter on {}", fields.join(", ")),
            ));
        }
        let v = match v.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
            Some(q) => q,
            None if !v.is_empty() && !v.contains(char::is_whitespace) && !v.contains('"') => v,
            None => return Err(bad(filter, &format!("value {v:?} of {k} is not quoted"))),
        };
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

fn bad(filter: &str, why: &str) -> crate::error::Error {
    invalid(format!("filter {filter:?}: {why}"))
        .with_reason("BAD_FILTER")
        .with_field("filter")
}

/// A fingerprint of everything but the position, bound into page tokens.
pub fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..6])
}

/// The token of the page after position `after` of the query `fp`.
pub fn token(after: i64, fp: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{after}.{fp}"))
}

/// The position a token names; `fp` must be the query's fingerprint.
pub fn position(token: &str, fp: &str) -> Result<Option<i64>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || {
        invalid("page_token is not a token of this list (or its filter changed): start again without it")
            .with_reason("BAD_PAGE_TOKEN")
            .with_field("page_token")
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (pos, got) = text.split_once('.').ok_or_else(bad)?;
    if got != fp {
        return Err(bad());
    }
    pos.parse().map(Some).map_err(|_| bad())
}

/// The page size asked for: default 50, at most 1000.
pub fn page_size(asked: i32) -> Result<usize> {
    match asked {
        0 => Ok(50),
        n if n < 0 => {
            Err(invalid(format!("page_size must not be negative, got {n}")).with_field("page_size"))
        }
        n => Ok((n as usize).min(1000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_quoted_and_bare_values_joined_by_and() {
        let f = parse(
            r#"state = "ACTIVE" AND os_type="linux" AND tag=nightly"#,
            IMAGE_FILTER_FIELDS,
        )
        .unwrap();
        assert_eq!(
            f,
            [
                ("state".into(), "ACTIVE".into()),
                ("os_type".into(), "linux".into()),
                ("tag".into(), "nightly".into())
            ]
        );
        assert!(parse("", IMAGE_FILTER_FIELDS).unwrap().is_empty());
        let e = parse("colour = \"red\"", IMAGE_FILTER_FIELDS).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(parse("state ACTIVE", IMAGE_FILTER_FIELDS).is_err());
    }

    #[test]
    fn tokens_are_bound_to_their_query() {
        let fp = fingerprint(&["projects/a", "state = \"ACTIVE\""]);
        let t = token(42, &fp);
        assert_eq!(position(&t, &fp).unwrap(), Some(42));
        let other = fingerprint(&["projects/a", ""]);
        assert_eq!(
            position(&t, &other).unwrap_err().facts().reason,
            "BAD_PAGE_TOKEN"
        );
        assert!(position("garbage!", &fp).is_err());
        assert_eq!(position("", &fp).unwrap(), None);
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(5000).unwrap(), 1000);
    }
}
