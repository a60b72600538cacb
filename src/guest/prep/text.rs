//! Text helpers of the prep steps' pure transforms: byte-exact decoding of guest files, lines
//! with their own line endings, and bounded unified diffs.
//!
//! Guest configuration files are edited as text but must come back byte-identical wherever the
//! edit does not touch them: [`decode`] keeps valid UTF-8 as it is and maps any other file byte
//! for byte onto Latin-1 characters, so [`encode`] restores the exact bytes (every key the steps
//! look for is ASCII). [`lines`] keeps each line's ending (`\n`, `\r\n`, or none for a last
//! line without newline), so CRLF files stay CRLF and a missing final newline stays missing
//! unless a line is appended after it.

use std::fmt::Write as _;

/// A file's text and how to turn it back into the same bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The text (Latin-1 mapped when the bytes were not UTF-8).
    pub text: String,
    /// The bytes were not UTF-8: each char stands for one byte.
    pub latin1: bool,
}

/// Text of a guest file, reversible by [`encode`].
pub fn decode(bytes: &[u8]) -> Decoded {
    match std::str::from_utf8(bytes) {
        Ok(s) => Decoded {
            text: s.to_string(),
            latin1: false,
        },
        Err(_) => Decoded {
            text: bytes.iter().map(|&b| char::from(b)).collect(),
            latin1: true,
        },
    }
}

/// The bytes of `text` for a file that [`decode`] read with `latin1`.
pub fn encode(text: &str, latin1: bool) -> Vec<u8> {
    if latin1 {
        text.chars()
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
            .collect()
    } else {
        text.as_bytes().to_vec()
    }
}

/// Human-readable text of file bytes (for diffs): UTF-8, else Latin-1.
pub fn display_text(bytes: &[u8]) -> String {
    decode(bytes).text
}

/// One line of a file: its text without the line ending, and the ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    pub text: &'a str,
    /// `"\n"`, `"\r\n"`, or `""` for a last line without newline.
    pub eol: &'a str,
}

/// The lines of `s`. An empty string has none; a final newline does not start a new line.
pub fn lines(s: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.find('\n') {
            Some(i) => {
                let (text, eol) = if i > 0 && rest.as_bytes()[i - 1] == b'\r' {
                    (&rest[..i - 1], &rest[i - 1..=i])
                } else {
                    (&rest[..i], &rest[i..=i])
                };
                out.push(Line { text, eol });
                rest = &rest[i + 1..];
            }
            None => {
                out.push(Line {
                    text: rest,
                    eol: "",
                });
                rest = "";
            }
        }
    }
    out
}

/// The line ending most lines of `s` use (`"\n"` when there are none).
pub fn dominant_eol(s: &str) -> &'static str {
    let crlf = s.matches("\r\n").count();
    let lf = s.matches('\n').count() - crlf;
    if crlf > lf {
        "\r\n"
    } else {
        "\n"
    }
}

/// Builds a file from lines, giving a line without ending (an old last line that now has
/// lines after it) the file's dominant ending.
#[derive(Debug)]
pub struct Builder {
    out: String,
    eol: &'static str,
    /// The last pushed line had no ending.
    open: bool,
}

impl Builder {
    /// A builder for a file whose lines end in `eol` by default.
    pub fn new(eol: &'static str, capacity: usize) -> Builder {
        Builder {
            out: String::with_capacity(capacity),
            eol,
            open: false,
        }
    }
    /// A line as it was (text and ending).
    pub fn keep(&mut self, l: &Line<'_>) {
        self.push(l.text, l.eol);
    }
    /// A line with `text` and the ending `eol` (`""` only for a last line).
    pub fn push(&mut self, text: &str, eol: &str) {
        if self.open {
            self.out.push_str(self.eol);
        }
        self.out.push_str(text);
        self.out.push_str(eol);
        self.open = eol.is_empty();
    }
    /// A new line with the file's default ending.
    pub fn line(&mut self, text: &str) {
        let eol = self.eol;
        self.push(text, eol);
    }
    /// The file.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Edits (deleted plus inserted lines) beyond which the diff falls back to "whole middle
/// replaced": bounds the diff's memory (about 4 x this squared bytes) and time.
const MAX_DIFF_EDITS: usize = 1000;
/// Longest diff text produced; the rest is cut with a note.
pub const MAX_DIFF_BYTES: usize = 256 << 10;
const CONTEXT: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Same(usize, usize),
    Del(usize),
    Ins(usize),
}

/// A unified diff (`diff -u` style, 3 lines of context) from `old` to `new`, labelled with the
/// guest path; `old` None is a new file, `new` None a removed one. Empty when equal. The text
/// is at most about [`MAX_DIFF_BYTES`] long and the work bounded whatever the input size.
pub fn unified_diff(path: &str, old: Option<&str>, new: Option<&str>) -> String {
    if old == new {
        return String::new();
    }
    let a = lines(old.unwrap_or(""));
    let b = lines(new.unwrap_or(""));
    let ops = diff_ops(&a, &b);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "--- {}",
        if old.is_some() {
            format!("a{path}")
        } else {
            "/dev/null".into()
        }
    );
    let _ = writeln!(
        out,
        "+++ {}",
        if new.is_some() {
            format!("b{path}")
        } else {
            "/dev/null".into()
        }
    );
    // Hunks: runs of changes with up to CONTEXT equal lines around them, merged when close.
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| !matches!(o, Op::Same(..)))
        .map(|(i, _)| i)
        .collect();
    let mut k = 0;
    while k < changed.len() {
        let start = changed[k].saturating_sub(CONTEXT);
        let mut end = changed[k];
        while k + 1 < changed.len() && changed[k + 1] <= end + 2 * CONTEXT + 1 {
            k += 1;
            end = changed[k];
        }
        let end = (end + CONTEXT + 1).min(ops.len());
        k += 1;
        let hunk = &ops[start..end];
        let (mut a0, mut b0) = (None, None);
        let (mut na, mut nb) = (0, 0);
        for o in hunk {
            match *o {
                Op::Same(i, j) => {
                    a0.get_or_insert(i);
                    b0.get_or_insert(j);
                    na += 1;
                    nb += 1;
                }
                Op::Del(i) => {
                    a0.get_or_insert(i);
                    na += 1;
                }
                Op::Ins(j) => {
                    b0.get_or_insert(j);
                    nb += 1;
                }
            }
        }
        // Where a side has no line in the hunk, its position is the line before.
        let pos_a = a0.unwrap_or_else(|| a_before(&ops, start));
        let pos_b = b0.unwrap_or_else(|| b_before(&ops, start));
        let range = |p: usize, n: usize, known: bool| {
            if n == 0 {
                format!("{p},0")
            } else if n == 1 {
                format!("{}", p + usize::from(known))
            } else {
                format!("{},{n}", p + usize::from(known))
            }
        };
        let _ = writeln!(
            out,
            "@@ -{} +{} @@",
            range(pos_a, na, a0.is_some()),
            range(pos_b, nb, b0.is_some())
        );
        for o in hunk {
            let (sign, l) = match *o {
                Op::Same(i, _) => (' ', a[i]),
                Op::Del(i) => ('-', a[i]),
                Op::Ins(j) => ('+', b[j]),
            };
            out.push(sign);
            out.push_str(l.text);
            out.push('\n');
            if l.eol.is_empty() {
                out.push_str("\\ No newline at end of file\n");
            }
            if out.len() > MAX_DIFF_BYTES {
                let mut cut = MAX_DIFF_BYTES;
                while !out.is_char_boundary(cut) {
                    cut -= 1;
                }
                out.truncate(cut);
                out.push_str("\n... (diff truncated)\n");
                return out;
            }
        }
    }
    out
}

/// Lines of `a` before op `start` (the position of an empty old side of a hunk).
fn a_before(ops: &[Op], start: usize) -> usize {
    ops[..start]
        .iter()
        .filter(|o| matches!(o, Op::Same(..) | Op::Del(_)))
        .count()
}
fn b_before(ops: &[Op], start: usize) -> usize {
    ops[..start]
        .iter()
        .filter(|o| matches!(o, Op::Same(..) | Op::Ins(_)))
        .count()
}

/// An edit script from `a` to `b`: common prefix and suffix, and Myers' shortest edit script
/// for the middle when it needs at most [`MAX_DIFF_EDITS`] edits, else the middle replaced
/// whole.
fn diff_ops(a: &[Line<'_>], b: &[Line<'_>]) -> Vec<Op> {
    let (n, m) = (a.len(), b.len());
    let mut p = 0;
    while p < n && p < m && a[p] == b[p] {
        p += 1;
    }
    let mut s = 0;
    while s < n - p && s < m - p && a[n - 1 - s] == b[m - 1 - s] {
        s += 1;
    }
    let (am, bm) = (&a[p..n - s], &b[p..m - s]);
    let mut ops: Vec<Op> = (0..p).map(|i| Op::Same(i, i)).collect();
    match myers(am, bm, MAX_DIFF_EDITS) {
        Some(mid) => {
            ops.extend(mid.into_iter().map(|o| match o {
                Op::Same(i, j) => Op::Same(p + i, p + j),
                Op::Del(i) => Op::Del(p + i),
                Op::Ins(j) => Op::Ins(p + j),
            }));
        }
        None => {
            ops.extend((0..am.len()).map(|i| Op::Del(p + i)));
            ops.extend((0..bm.len()).map(|j| Op::Ins(p + j)));
        }
    }
    ops.extend((0..s).map(|k| Op::Same(n - s + k, m - s + k)));
    ops
}

/// Myers' O((N+M)D) shortest edit script, or None when it needs more than `max_d` edits.
fn myers(a: &[Line<'_>], b: &[Line<'_>], max_d: usize) -> Option<Vec<Op>> {
    let (n, m) = (a.len() as i64, b.len() as i64);
    let max_d = max_d.min((n + m) as usize) as i64;
    let off = max_d + 1;
    let mut v = vec![0i64; (2 * off + 1) as usize];
    // trace[d][k + d] = furthest x on diagonal k after d edits.
    let mut trace: Vec<Vec<i64>> = Vec::new();
    let mut found = None;
    'outer: for d in 0..=max_d {
        for k in (-d..=d).step_by(2) {
            let down = k == -d || (k != d && v[(k - 1 + off) as usize] < v[(k + 1 + off) as usize]);
            let mut x = if down {
                v[(k + 1 + off) as usize]
            } else {
                v[(k - 1 + off) as usize] + 1
            };
            let mut y = x - k;
            while x < n && y < m && a[x as usize] == b[y as usize] {
                x += 1;
                y += 1;
            }
            v[(k + off) as usize] = x;
            if x >= n && y >= m {
                trace.push(v[(off - d) as usize..=(off + d) as usize].to_vec());
                found = Some(d);
                break 'outer;
            }
        }
        trace.push(v[(off - d) as usize..=(off + d) as usize].to_vec());
    }
    let dmax = found?;
    let mut ops = Vec::new();
    let (mut x, mut y) = (n, m);
    for d in (1..=dmax).rev() {
        let prev = &trace[(d - 1) as usize];
        let at = |k: i64| prev[(k + d - 1) as usize];
        let k = x - y;
        let down = k == -d || (k != d && at(k - 1) < at(k + 1));
        let pk = if down { k + 1 } else { k - 1 };
        let px = at(pk);
        let py = px - pk;
        let (sx, sy) = if down { (px, py + 1) } else { (px + 1, py) };
        while x > sx && y > sy {
            x -= 1;
            y -= 1;
            ops.push(Op::Same(x as usize, y as usize));
        }
        if down {
            ops.push(Op::Ins(py as usize));
        } else {
            ops.push(Op::Del(px as usize));
        }
        x = px;
        y = py;
    }
    while x > 0 && y > 0 {
        x -= 1;
        y -= 1;
        ops.push(Op::Same(x as usize, y as usize));
    }
    ops.reverse();
    normalize(&mut ops);
    Some(ops)
}

/// Within each run of changes, deletions first, then insertions (each in order).
fn normalize(ops: &mut [Op]) {
    let mut i = 0;
    while i < ops.len() {
        if matches!(ops[i], Op::Same(..)) {
            i += 1;
            continue;
        }
        let start = i;
        while i < ops.len() && !matches!(ops[i], Op::Same(..)) {
            i += 1;
        }
        ops[start..i].sort_by_key(|o| match *o {
            Op::Del(x) => (0, x),
            Op::Ins(x) => (1, x),
            Op::Same(..) => (2, 0),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_is_byte_exact() {
        for bytes in [
            &b"plain\n"[..],
            "caf\u{e9}\n".as_bytes(),
            b"latin1 \xe9\xff\x00 bytes\r\n",
            b"",
        ] {
            let d = decode(bytes);
            assert_eq!(encode(&d.text, d.latin1), bytes);
        }
        assert!(decode(b"\xff").latin1);
        assert!(!decode("\u{e9}".as_bytes()).latin1);
    }

    #[test]
    fn lines_keep_their_endings() {
        let l = lines("a\nb\r\nc");
        assert_eq!(
            l,
            vec![
                Line {
                    text: "a",
                    eol: "\n"
                },
                Line {
                    text: "b",
                    eol: "\r\n"
                },
                Line { text: "c", eol: "" }
            ]
        );
        assert!(lines("").is_empty());
        assert_eq!(lines("\n").len(), 1);
        assert_eq!(dominant_eol("a\r\nb\r\nc\n"), "\r\n");
        assert_eq!(dominant_eol("x"), "\n");
        // A last line without newline gets one when a line follows.
        let mut b = Builder::new("\r\n", 0);
        for l in lines("a\r\nb") {
            b.keep(&l);
        }
        b.line("c");
        assert_eq!(b.finish(), "a\r\nb\r\nc\r\n");
    }

    #[test]
    fn unified_diff_shapes() {
        assert_eq!(unified_diff("/x", Some("a\n"), Some("a\n")), "");
        // Changes 6 equal lines apart share a hunk (as GNU diff does); 7 apart do not.
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n12\n";
        let new = "1\n2\n3\nfour\n5\n6\n7\n8\n9\n10\n12\n";
        assert!(unified_diff("/etc/f", Some(old), Some(new)).contains("@@ -1,12 +1,11 @@\n"));
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n11\n12\n13\n";
        let new = "1\n2\n3\nfour\n5\n6\n7\n8\n9\n10\n11\n13\n";
        assert_eq!(
            unified_diff("/etc/f", Some(old), Some(new)),
            "--- a/etc/f\n+++ b/etc/f\n@@ -1,7 +1,7 @@\n 1\n 2\n 3\n-4\n+four\n 5\n 6\n 7\n\
             @@ -9,5 +9,4 @@\n 9\n 10\n 11\n-12\n 13\n"
        );
        assert_eq!(
            unified_diff("/r", Some("x\ny"), None),
            "--- a/r\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-x\n-y\n\\ No newline at end of file\n"
        );
        assert_eq!(
            unified_diff("/n", None, Some("x\n")),
            "--- /dev/null\n+++ b/n\n@@ -0,0 +1 @@\n+x\n"
        );
        // Insertion only.
        assert_eq!(
            unified_diff("/i", Some("a\nb\n"), Some("a\nnew\nb\n")),
            "--- a/i\n+++ b/i\n@@ -1,2 +1,3 @@\n a\n+new\n b\n"
        );
        // An appended line after a last line without newline.
        assert_eq!(
            unified_diff("/e", Some("a"), Some("a\nb\n")),
            "--- a/e\n+++ b/e\n@@ -1 +1,2 @@\n-a\n\\ No newline at end of file\n+a\n+b\n"
        );
    }

    #[test]
    fn huge_diffs_are_bounded() {
        let old: String = (0..200_000).map(|i| format!("line {i}\n")).collect();
        let new: String = (0..200_000).map(|i| format!("other {i}\n")).collect();
        let t = std::time::Instant::now();
        let d = unified_diff("/big", Some(&old), Some(&new));
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        assert!(d.len() <= MAX_DIFF_BYTES + 100);
        assert!(d.ends_with("... (diff truncated)\n"));
        // Scattered small edits in a big file stay exact.
        let new2 = old
            .replacen("line 10\n", "", 1)
            .replacen("line 199990\n", "x\n", 1);
        let d = unified_diff("/big", Some(&old), Some(&new2));
        assert!(
            d.contains("-line 10\n") && d.contains("-line 199990\n+x\n"),
            "{d}"
        );
    }
}
