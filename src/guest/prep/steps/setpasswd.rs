//! The `setpasswd-hook` step: make sure `sh /etc/init.d/setpasswd.sh` runs from the
//! distribution's rc script: `/etc/init.d/rc` (Ubuntu, SUSE) or `/etc/rc.d/rc` (CentOS).
//!
//! The hook line goes before the script's final `exit` statement when it ends with one (an
//! `exit 0` as the guides say, and also any other final `exit`, after which an appended line
//! would never run), else it is appended. A script that already runs `/etc/init.d/setpasswd.sh`
//! on a line that is not a comment is left as it is, so the hook is never there twice. Each of
//! the two files that exists is hooked (the same file reached through a link only once); when
//! neither exists the step does not apply.

use std::collections::BTreeSet;

use super::{Inspection, Step};
use crate::error::Result;
use crate::guest::prep::io::GuestIo;
use crate::guest::prep::text::{dominant_eol, lines, Builder};
use crate::guest::prep::{PrepStep, Transform};

/// The rc scripts, in the order they are looked at.
pub const RC_FILES: &[&str] = &["/etc/init.d/rc", "/etc/rc.d/rc"];
/// The script the hook runs.
pub const SETPASSWD_SCRIPT: &str = "/etc/init.d/setpasswd.sh";
/// The line added.
pub const HOOK_LINE: &str = "sh /etc/init.d/setpasswd.sh";

fn is_comment_or_blank(t: &str) -> bool {
    let t = t.trim_start();
    t.is_empty() || t.starts_with('#')
}

/// The line calls the setpasswd script (as a word of a command, not in a comment).
fn runs_setpasswd(t: &str) -> bool {
    let code = t.split('#').next().unwrap_or("");
    code.split(|c: char| {
        c.is_whitespace() || c == ';' || c == '&' || c == '|' || c == '"' || c == '\''
    })
    .any(|w| w == SETPASSWD_SCRIPT)
}

/// A top-level `exit` statement: `exit`, `exit 0`, `exit $?`, with an optional `;` and comment.
fn is_exit(t: &str) -> bool {
    let code = t.split('#').next().unwrap_or("").trim();
    let code = code.strip_suffix(';').unwrap_or(code).trim_end();
    let mut words = code.split_whitespace();
    words.next() == Some("exit") && words.count() <= 1
}

/// An rc script with the hook line (see the module doc).
pub fn add_hook(text: &str) -> Transform {
    let ls = lines(text);
    if ls
        .iter()
        .any(|l| !is_comment_or_blank(l.text) && runs_setpasswd(l.text))
    {
        return Transform {
            text: text.to_string(),
            notes: Vec::new(),
        };
    }
    let last = ls.iter().rposition(|l| !is_comment_or_blank(l.text));
    let before = last.filter(|&i| is_exit(ls[i].text));
    let mut b = Builder::new(dominant_eol(text), text.len() + HOOK_LINE.len() + 2);
    let mut notes = Vec::new();
    for (i, l) in ls.iter().enumerate() {
        if Some(i) == before {
            let indent = &l.text[..l.text.len() - l.text.trim_start().len()];
            b.line(&format!("{indent}{HOOK_LINE}"));
            notes.push(format!("hook inserted before `{}`", l.text.trim()));
        }
        b.keep(l);
    }
    if before.is_none() {
        b.line(HOOK_LINE);
        notes.push("hook appended".into());
    }
    Transform {
        text: b.finish(),
        notes,
    }
}

/// The `setpasswd-hook` step.
pub(crate) struct SetpasswdHook;

impl Step for SetpasswdHook {
    fn id(&self) -> PrepStep {
        PrepStep::SetpasswdHook
    }

    fn inspect(&self, io: &GuestIo<'_>) -> Result<Inspection> {
        inspection(io)
    }
}

/// The rc scripts that exist, each hooked once.
fn inspection(io: &GuestIo<'_>) -> Result<Inspection> {
    let mut w = Inspection::default();
    let out = io.sh(
        "looking for the rc scripts",
        r#"for f in "$@"; do if [ -f "$f" ]; then readlink -f -- "$f"; else echo; fi; done
if [ -e /etc/init.d/setpasswd.sh ]; then echo yes; else echo no; fi"#,
        RC_FILES,
    )?;
    let lines: Vec<&str> = out.lines().collect();
    let mut seen = BTreeSet::new();
    for (i, rc) in RC_FILES.iter().enumerate() {
        let real = lines.get(i).copied().unwrap_or("").trim();
        if real.is_empty() {
            continue;
        }
        w.applicable = true;
        if !seen.insert(real.to_string()) {
            w.notes.push(format!(
                "{rc}: the same file as an rc script already hooked"
            ));
            continue;
        }
        io.edit_file(&mut w, rc, add_hook)?;
    }
    if !w.applicable {
        w.notes.push(format!(
            "not applicable: neither {} exists",
            RC_FILES.join(" nor ")
        ));
    } else if lines.get(RC_FILES.len()).copied() == Some("no") {
        w.notes.push(format!(
            "{} does not exist in the guest (yet); the hook runs it when it does",
            SETPASSWD_SCRIPT
        ));
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_before_final_exit_0() {
        let src = "#! /bin/sh\n# rc\nrunlevel=$1\n[ -x x ] && exit 1\n\nexit 0\n\n# end\n";
        let t = add_hook(src);
        assert_eq!(
            t.text,
            "#! /bin/sh\n# rc\nrunlevel=$1\n[ -x x ] && exit 1\n\nsh /etc/init.d/setpasswd.sh\nexit 0\n\n# end\n"
        );
        assert_eq!(add_hook(&t.text).text, t.text, "never twice");
    }

    #[test]
    fn appended_without_final_exit_crlf_and_missing_newline() {
        assert_eq!(
            add_hook("#!/bin/bash\r\nfor i in a; do\r\n  exit 0\r\ndone").text,
            "#!/bin/bash\r\nfor i in a; do\r\n  exit 0\r\ndone\r\nsh /etc/init.d/setpasswd.sh\r\n"
        );
        assert_eq!(add_hook("").text, "sh /etc/init.d/setpasswd.sh\n");
        // Indented final exit (and `exit $?;` with a comment) keeps its indentation.
        assert_eq!(
            add_hook("x\n\texit $?; # done\n").text,
            "x\n\tsh /etc/init.d/setpasswd.sh\n\texit $?; # done\n"
        );
    }

    #[test]
    fn existing_hooks_count_but_comments_do_not() {
        for present in [
            "sh /etc/init.d/setpasswd.sh\nexit 0\n",
            "/bin/sh /etc/init.d/setpasswd.sh &\n",
            "[ -f /etc/init.d/setpasswd.sh ] && sh \"/etc/init.d/setpasswd.sh\"\n",
        ] {
            assert_eq!(add_hook(present).text, present);
        }
        assert_eq!(
            add_hook("# sh /etc/init.d/setpasswd.sh\nexit 0\n").text,
            "# sh /etc/init.d/setpasswd.sh\nsh /etc/init.d/setpasswd.sh\nexit 0\n"
        );
        assert_eq!(
            add_hook("echo /etc/init.d/setpasswd.sh.old\n").text,
            "echo /etc/init.d/setpasswd.sh.old\nsh /etc/init.d/setpasswd.sh\n"
        );
    }
}
