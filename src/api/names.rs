//! Resource names (AIP-122): `domains/{domain}`, `images/{image}`, `operations/{operation}`.
//! Requests name resources this way; a bare ID is refused with the form expected, so a client
//! learns the convention from its first mistake.

use crate::error::{invalid, Result};

/// The collection of domains.
pub const DOMAINS: &str = "domains";
/// The collection of images.
pub const IMAGES: &str = "images";
/// The collection of operations.
pub const OPERATIONS: &str = "operations";

/// Longest resource name accepted in a request.
const MAX_NAME_LEN: usize = 300;

/// The ID in `{collection}/{id}` given in request field `field`; INVALID_ARGUMENT (naming the
/// field and the expected form) when it is empty, has another collection, or nested segments.
pub fn parse<'a>(collection: &str, name: &'a str, field: &str) -> Result<&'a str> {
    let bad = |why: String| {
        invalid(format!(
            "{field} {name:?} {why}: give `{collection}/ID`, e.g. `{collection}/{}`",
            example(collection)
        ))
        .with_field(field)
        .with_reason("INVALID_RESOURCE_NAME")
    };
    if name.is_empty() {
        return Err(bad("is empty".into()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(format!("is longer than {MAX_NAME_LEN} characters")));
    }
    match name.split_once('/') {
        Some((c, id)) if c == collection && !id.is_empty() && !id.contains('/') => Ok(id),
        Some((c, _)) if c != collection => Err(bad(format!("is not in {collection}"))),
        _ => Err(bad("is not a resource name".into())),
    }
}

/// `{collection}/{id}`.
pub fn name(collection: &str, id: &str) -> String {
    format!("{collection}/{id}")
}

fn example(collection: &str) -> &'static str {
    match collection {
        DOMAINS => "web1",
        IMAGES => "web1-2026-12-01",
        _ => "op-1a2b3c4d",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_refusals_name_the_field() {
        assert_eq!(parse(IMAGES, "images/base", "name").unwrap(), "base");
        for bad in ["", "base", "domains/base", "images/", "images/a/b"] {
            let e = parse(IMAGES, bad, "name").unwrap_err();
            assert_eq!(e.facts().field, "name");
            assert_eq!(e.facts().reason, "INVALID_RESOURCE_NAME");
            assert!(e.to_string().contains("images/ID"), "{e}");
        }
        assert_eq!(name(DOMAINS, "web1"), "domains/web1");
    }
}
