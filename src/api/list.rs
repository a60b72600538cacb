//! List methods' common half: paging (AIP-158), `filter` (a subset of AIP-160) and `order_by`
//! (AIP-132), over any resource that exposes its fields through [`Fields`].
//!
//! - `page_size`: 0 means [`DEFAULT_PAGE_SIZE`]; above [`MAX_PAGE_SIZE`] it is lowered; negative
//!   is INVALID_ARGUMENT.
//! - `page_token`: opaque to clients; it holds the sort key and name of the last item returned
//!   and a digest of the filter and order, so the next page starts right after that item even
//!   when items were added or removed meanwhile, and a token used with another filter or order
//!   is refused (INVALID_ARGUMENT).
//! - `filter`: terms `field OP value` joined by `AND` (and `OR`, which binds tighter, as AIP-160
//!   says); `NOT term` or `-term` negates one. OP is `=`, `!=`, `:` (contains), `<`, `<=`, `>`,
//!   `>=` (numbers). String values may be quoted; in `=` a trailing `*` matches a prefix. Enum
//!   fields take the value's short name (`RUNNING`) or full name (`DOMAIN_STATE_RUNNING`).
//!   Parentheses are not supported (the error says so).
//! - `order_by`: `field [desc]` joined by commas; ties are broken by the resource name.

use std::cmp::Ordering;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{invalid, Error, Result};

/// Page size when the request gives none.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page served; larger requests are lowered to it.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Longest filter or order_by accepted.
const MAX_EXPR_LEN: usize = 2048;

/// The value of one field, as filters and orderings see it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Value {
    /// A number (sizes, counts, unix times).
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// An enum value's short name (`RUNNING`); `prefix` is its type's (`DOMAIN_STATE_`).
    Enum(String, String),
    /// Free text or a resource name.
    Str(String),
}

/// A resource that can be filtered, ordered and paged.
pub trait Fields {
    /// The resource name (`images/x`): the tie-breaker and the page token's anchor.
    fn name(&self) -> String;
    /// The value of `field`, `None` when it is not one the List method supports.
    fn field(&self, field: &str) -> Option<Value>;
}

/// A List request's paging, filter and order, as parsed.
#[derive(Debug)]
pub struct Query {
    page_size: usize,
    filter: Vec<Vec<Term>>,
    order: Vec<(String, bool)>,
    after: Option<Token>,
    digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Token {
    d: String,
    k: Vec<Option<Value>>,
    n: String,
}

#[derive(Debug)]
struct Term {
    negate: bool,
    field: String,
    op: Op,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Has,
    Lt,
    Le,
    Gt,
    Ge,
}

fn bad(field: &str, msg: String) -> Error {
    invalid(msg)
        .with_field(field)
        .with_reason("INVALID_LIST_REQUEST")
}

impl Query {
    /// Parses a List request. `fields` are the names `filter` and `order_by` may use (checked
    /// against a sample of the resource at query time is not possible for an empty list, so they
    /// are given here); `default_order` applies when `order_by` is empty.
    pub fn parse(
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
        fields: &[&str],
        default_order: &str,
    ) -> Result<Query> {
        let page_size = match page_size {
            n if n < 0 => {
                return Err(bad(
                    "page_size",
                    format!("page_size {n} is negative: give 0 (default) to {MAX_PAGE_SIZE}"),
                ))
            }
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        for (what, s) in [("filter", filter), ("order_by", order_by)] {
            if s.len() > MAX_EXPR_LEN {
                return Err(bad(
                    what,
                    format!(
                        "{what} is {} characters long; at most {MAX_EXPR_LEN}",
                        s.len()
                    ),
                ));
            }
        }
        let filter_terms = parse_filter(filter, fields)?;
        let order_src = if order_by.trim().is_empty() {
            default_order
        } else {
            order_by
        };
        let order = parse_order(order_src, fields)?;
        let digest = hex::encode(&Sha256::digest(format!("{filter}\0{order_src}"))[..8]);
        let after = if page_token.is_empty() {
            None
        } else {
            let t: Token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(page_token)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| {
                    bad(
                        "page_token",
                        "page_token is not one this server issued: pass the \
                         next_page_token of the previous page unchanged"
                            .into(),
                    )
                })?;
            if t.d != digest {
                return Err(bad(
                    "page_token",
                    "page_token was issued for another filter or order_by: keep them the same \
                     while paging, or start again without a token"
                        .into(),
                ));
            }
            Some(t)
        };
        Ok(Query {
            page_size,
            filter: filter_terms,
            order,
            after,
            digest,
        })
    }

    /// One page of `items`: filtered, ordered, starting after the token's item; with the token
    /// of the next page ("" when this is the last).
    pub fn page<T: Fields>(&self, items: Vec<T>) -> Result<(Vec<T>, String)> {
        let mut keyed = Vec::new();
        for it in items {
            if self.matches(&it)? {
                let key: Vec<Option<Value>> = self.order.iter().map(|(f, _)| it.field(f)).collect();
                keyed.push((key, it.name(), it));
            }
        }
        keyed.sort_by(|a, b| self.cmp(&a.0, &a.1, &b.0, &b.1));
        let start = match &self.after {
            None => 0,
            Some(t) => {
                keyed.partition_point(|(k, n, _)| self.cmp(k, n, &t.k, &t.n) != Ordering::Greater)
            }
        };
        let rest = keyed.len() - start;
        let page: Vec<_> = keyed.into_iter().skip(start).take(self.page_size).collect();
        let next = if rest > self.page_size {
            let (k, n, _) = page.last().expect("a full page has a last item");
            let t = Token {
                d: self.digest.clone(),
                k: k.clone(),
                n: n.clone(),
            };
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(serde_json::to_vec(&t).expect("a token serializes"))
        } else {
            String::new()
        };
        Ok((page.into_iter().map(|(_, _, it)| it).collect(), next))
    }

    fn cmp(&self, ak: &[Option<Value>], an: &str, bk: &[Option<Value>], bn: &str) -> Ordering {
        for (i, (_, desc)) in self.order.iter().enumerate() {
            let o = ak.get(i).cmp(&bk.get(i));
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        an.cmp(bn)
    }

    fn matches<T: Fields>(&self, it: &T) -> Result<bool> {
        for any in &self.filter {
            let mut ok = false;
            for t in any {
                if term_matches(t, it)? {
                    ok = true;
                    break;
                }
            }
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn term_matches<T: Fields>(t: &Term, it: &T) -> Result<bool> {
    let Some(v) = it.field(&t.field) else {
        return Ok(false);
    };
    let m = match (&v, t.op) {
        (Value::Str(s), Op::Eq) => match t.value.strip_suffix('*') {
            Some(p) => s.starts_with(p),
            None => *s == t.value,
        },
        (Value::Str(s), Op::Ne) => *s != t.value,
        (Value::Str(s), Op::Has) => s.contains(&t.value),
        (Value::Enum(s, prefix), Op::Eq | Op::Has | Op::Ne) => {
            let want = t.value.to_ascii_uppercase();
            let want = want.strip_prefix(prefix.as_str()).unwrap_or(&want);
            (s == want) != (t.op == Op::Ne)
        }
        (Value::Bool(b), Op::Eq | Op::Ne | Op::Has) => {
            let want = match t.value.as_str() {
                "true" => true,
                "false" => false,
                v => {
                    return Err(bad(
                        "filter",
                        format!("filter: {} takes true or false, not {v:?}", t.field),
                    ))
                }
            };
            (*b == want) != (t.op == Op::Ne)
        }
        (Value::Int(n), op) => {
            let want: i64 = t.value.parse().map_err(|_| {
                bad(
                    "filter",
                    format!("filter: {} takes a number, not {:?}", t.field, t.value),
                )
            })?;
            match op {
                Op::Eq | Op::Has => *n == want,
                Op::Ne => *n != want,
                Op::Lt => *n < want,
                Op::Le => *n <= want,
                Op::Gt => *n > want,
                Op::Ge => *n >= want,
            }
        }
        (_, op) => {
            return Err(bad(
                "filter",
                format!(
                    "filter: {} cannot be compared with {}",
                    t.field,
                    op_text(op)
                ),
            ))
        }
    };
    Ok(m != t.negate)
}

fn op_text(op: Op) -> &'static str {
    match op {
        Op::Eq => "=",
        Op::Ne => "!=",
        Op::Has => ":",
        Op::Lt => "<",
        Op::Le => "<=",
        Op::Gt => ">",
        Op::Ge => ">=",
    }
}

/// Splits a filter into words, keeping quoted strings whole and operators apart.
fn tokens(s: &str) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let mut v = String::new();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => v.extend(chars.next()),
                    Some(c) => v.push(c),
                    None => {
                        return Err(bad("filter", "filter: a quoted value is not closed".into()))
                    }
                }
            }
            out.push((v, true));
        } else if c == '(' || c == ')' {
            return Err(bad(
                "filter",
                "filter: parentheses are not supported: write terms joined by AND, \
                 alternatives of one term by OR (OR binds tighter)"
                    .into(),
            ));
        } else if matches!(c, '=' | '!' | '<' | '>' | ':') {
            let mut op = String::from(c);
            chars.next();
            if chars.peek() == Some(&'=') && c != '=' && c != ':' {
                op.push('=');
                chars.next();
            }
            out.push((op, false));
        } else {
            let mut w = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || matches!(c, '=' | '!' | '<' | '>' | ':' | '"' | '(' | ')') {
                    break;
                }
                w.push(c);
                chars.next();
            }
            out.push((w, false));
        }
    }
    Ok(out)
}

fn parse_filter(s: &str, fields: &[&str]) -> Result<Vec<Vec<Term>>> {
    let toks = tokens(s)?;
    let mut all: Vec<Vec<Term>> = Vec::new();
    let mut any: Vec<Term> = Vec::new();
    let mut i = 0;
    let word = |i: usize| toks.get(i).filter(|t| !t.1).map(|t| t.0.as_str());
    while i < toks.len() {
        let mut negate = false;
        if word(i) == Some("NOT") {
            negate = true;
            i += 1;
        }
        let Some((mut field, quoted)) = toks.get(i).cloned() else {
            return Err(bad("filter", "filter: ends after NOT".into()));
        };
        if quoted {
            return Err(bad(
                "filter",
                format!("filter: expected a field name, found \"{field}\""),
            ));
        }
        if let Some(f) = field.strip_prefix('-') {
            negate = !negate;
            field = f.to_string();
        }
        if !fields.contains(&field.as_str()) {
            return Err(bad(
                "filter",
                format!(
                    "filter: unknown field {field:?}; this list filters on {}",
                    fields.join(", ")
                ),
            ));
        }
        let op = match word(i + 1) {
            Some("=") => Op::Eq,
            Some("!=") => Op::Ne,
            Some(":") => Op::Has,
            Some("<") => Op::Lt,
            Some("<=") => Op::Le,
            Some(">") => Op::Gt,
            Some(">=") => Op::Ge,
            _ => {
                return Err(bad(
                    "filter",
                    format!("filter: {field} must be followed by =, !=, :, <, <=, > or >="),
                ))
            }
        };
        let Some((value, _)) = toks.get(i + 2).cloned() else {
            return Err(bad(
                "filter",
                format!("filter: {field} {} has no value", op_text(op)),
            ));
        };
        any.push(Term {
            negate,
            field,
            op,
            value,
        });
        i += 3;
        match word(i) {
            None if i >= toks.len() => {}
            Some("OR") => i += 1,
            Some("AND") => {
                all.push(std::mem::take(&mut any));
                i += 1;
            }
            _ => {
                // AIP-160: terms side by side are joined by AND.
                all.push(std::mem::take(&mut any));
            }
        }
    }
    if !any.is_empty() {
        all.push(any);
    }
    Ok(all)
}

fn parse_order(s: &str, fields: &[&str]) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut w = part.split_whitespace();
        let field = w.next().unwrap_or_default();
        let desc = match w.next() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(x) => {
                return Err(bad(
                    "order_by",
                    format!("order_by: {x:?} after {field}: write `{field}` or `{field} desc`"),
                ))
            }
        };
        if w.next().is_some() || !fields.contains(&field) {
            return Err(bad(
                "order_by",
                format!(
                    "order_by: cannot order by {part:?}; use one of {} (optionally ` desc`)",
                    fields.join(", ")
                ),
            ));
        }
        out.push((field.to_string(), desc));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    struct Item {
        name: String,
        state: &'static str,
        size: i64,
        ok: bool,
    }

    impl Fields for Item {
        fn name(&self) -> String {
            self.name.clone()
        }
        fn field(&self, f: &str) -> Option<Value> {
            Some(match f {
                "name" => Value::Str(self.name.clone()),
                "state" => Value::Enum(self.state.into(), "STATE_".into()),
                "size_bytes" => Value::Int(self.size),
                "ok" => Value::Bool(self.ok),
                _ => return None,
            })
        }
    }

    const FIELDS: &[&str] = &["name", "state", "size_bytes", "ok"];

    fn items(n: usize) -> Vec<Item> {
        (0..n)
            .map(|i| Item {
                name: format!("images/i{i:03}"),
                state: if i % 2 == 0 { "ACTIVE" } else { "FAILED" },
                size: (i as i64 * 7) % 10,
                ok: i % 3 == 0,
            })
            .collect()
    }

    fn names(v: &[Item]) -> Vec<String> {
        v.iter().map(|i| i.name.clone()).collect()
    }

    fn q(size: i32, token: &str, filter: &str, order: &str) -> Result<Query> {
        Query::parse(size, token, filter, order, FIELDS, "name")
    }

    #[test]
    fn pages_cover_every_item_once_in_order() {
        let all = items(250);
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let (page, next) = q(100, &token, "", "").unwrap().page(all.clone()).unwrap();
            pages += 1;
            seen.extend(names(&page));
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, names(&all));
    }

    #[test]
    fn a_page_resumes_after_its_anchor_even_when_items_change() {
        let all = items(10);
        let (p1, t) = q(4, "", "", "size_bytes desc")
            .unwrap()
            .page(all.clone())
            .unwrap();
        // Remove the anchor itself and add an item that sorts before it: no repeats, no gaps.
        let mut changed: Vec<Item> = all
            .iter()
            .filter(|i| i.name != p1[3].name)
            .cloned()
            .collect();
        changed.push(Item {
            name: "images/new".into(),
            state: "ACTIVE",
            size: 99,
            ok: true,
        });
        let (p2, _) = q(100, &t, "", "size_bytes desc")
            .unwrap()
            .page(changed)
            .unwrap();
        for i in &p1 {
            assert!(!names(&p2).contains(&i.name), "{} repeated", i.name);
        }
        assert_eq!(
            p1.len() + p2.len(),
            10,
            "everything but the removed anchor, plus none new"
        );
    }

    #[test]
    fn filters_and_or_not_enum_prefix_numbers() {
        let all = items(20);
        let f = |s: &str| names(&q(0, "", s, "").unwrap().page(all.clone()).unwrap().0);
        assert_eq!(f("state = ACTIVE").len(), 10);
        assert_eq!(f("state = STATE_FAILED").len(), 10);
        assert_eq!(f("state != ACTIVE AND ok = true").len(), 3);
        assert_eq!(f("NOT state = ACTIVE").len(), 10);
        assert_eq!(f("-state = ACTIVE").len(), 10);
        assert_eq!(f("name = \"images/i01*\"").len(), 10);
        assert_eq!(f("name = images/i005 OR name = images/i006").len(), 2);
        assert_eq!(
            f("size_bytes >= 5 state = ACTIVE").len(),
            f("size_bytes >= 5 AND state = ACTIVE").len()
        );
        assert_eq!(f("name : i01").len(), 10);
    }

    #[test]
    fn bad_requests_name_the_field() {
        for (filter, order, token, field) in [
            ("colour = red", "", "", "filter"),
            ("(state = ACTIVE)", "", "", "filter"),
            ("state =", "", "", "filter"),
            ("name = \"open", "", "", "filter"),
            ("size_bytes > big", "", "", "filter"),
            ("", "colour", "", "order_by"),
            ("", "name sideways", "", "order_by"),
            ("", "", "not-a-token", "page_token"),
        ] {
            let e = q(0, token, filter, order)
                .and_then(|q| q.page(items(3)).map(|_| ()))
                .unwrap_err();
            assert_eq!(
                e.facts().field,
                field,
                "{filter:?} {order:?}: {}",
                e.chain()
            );
        }
        assert_eq!(q(-1, "", "", "").unwrap_err().facts().field, "page_size");
        let (_, t) = q(1, "", "", "").unwrap().page(items(3)).unwrap();
        let e = q(1, &t, "state = ACTIVE", "").unwrap_err();
        assert!(e.to_string().contains("another filter"), "{e}");
        assert_eq!(q(5000, "", "", "").unwrap().page_size, MAX_PAGE_SIZE);
    }
}
