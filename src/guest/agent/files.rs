//! Guest file helpers of [`QgaClient`]: read through `guest-file-open`/`guest-file-read` in
//! pieces, and write, remove, list and rename through POSIX `sh` programs run by `guest-exec`
//! (Linux guests). Paths must be absolute, without newlines or NUL bytes.

use std::time::Duration;

use serde_json::{json, Value};

use super::client::{bad_reply, context, decode_b64_capped, encode_b64, first_line, is_agent_down};
use super::{GuestAgent, QgaClient, QgaTransport, MAX_GUEST_BYTES, READ_PIECE, WRITE_PIECE};
use crate::error::{Error, ErrorKind, Result};

/// Time allowed for the helper programs behind `write_file`, `list_dir`, ...
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// Files up to this size are written in one `guest-exec` (the bytes on its stdin, within the
/// command size limit of [`WRITE_PIECE`]); larger ones through a temporary file and
/// `guest-file-write` in pieces.
const STDIN_WRITE_MAX: usize = WRITE_PIECE;

/// `write_file`, first part (`sh -c` with `$1` = path, `$2` = mode or empty): follow a link
/// to the file really written, make a temporary file next to it (`$p`, `$t`).
const WRITE_PREPARE: &str = r#"p=$1 m=$2
fail() { rm -f -- "$t"; echo "$1" >&2; exit 1; }
if [ -L "$p" ]; then p=$(readlink -f -- "$p") || fail "cannot resolve the link"; fi
t=$(mktemp "$(dirname -- "$p")/.imaged-tmp.XXXXXX") ||
  { echo "cannot create a temporary file" >&2; exit 1; }"#;

/// The same for a temporary file made earlier (`$3`).
const WRITE_PREPARE_EXISTING: &str = r#"p=$1 m=$2 t=$3
fail() { rm -f -- "$t"; echo "$1" >&2; exit 1; }
if [ -L "$p" ]; then p=$(readlink -f -- "$p") || fail "cannot resolve the link"; fi"#;

/// `write_file`, last part: owner and mode of the original (or the asked mode, or 0644 for a
/// new file), flushed, renamed over the original, SELinux label restored where there is one.
const WRITE_FINISH: &str = r#"if [ -e "$p" ]; then
  o=$(stat -c %u:%g -- "$p") && a=$(stat -c %a -- "$p") || fail "cannot stat the original"
  chown "$o" "$t" && chmod "$a" "$t" || fail "cannot set owner and mode"
elif [ -z "$m" ]; then
  chmod 644 "$t" || fail "cannot set the mode"
fi
if [ -n "$m" ]; then chmod "$m" "$t" || fail "cannot set mode $m"; fi
sync -- "$t" 2>/dev/null
mv -f -- "$t" "$p" || fail "cannot rename the temporary file"
if command -v restorecon >/dev/null 2>&1; then restorecon -- "$p" 2>/dev/null; fi
exit 0"#;

impl<T: QgaTransport> QgaClient<T> {
    /// Runs a helper `sh -c SCRIPT sh ARGS...` that must exit 0; returns its stdout.
    fn helper(&self, what: &str, script: &str, args: &[&str]) -> Result<Vec<u8>> {
        self.run_helper(what, script, args, None)
    }

    /// [`QgaClient::helper`] with bytes on its stdin.
    fn helper_input(&self, what: &str, script: &str, args: &[&str], input: &[u8]) -> Result<()> {
        self.run_helper(what, script, args, Some(input)).map(|_| ())
    }

    fn run_helper(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        let out = self.exec(&argv, input, HELPER_TIMEOUT)?;
        if !out.success() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "{what} in domain {} failed (exit status {}): {}",
                    self.dom(),
                    out.exit_code,
                    first_line(&out.stderr_text())
                ),
            ));
        }
        Ok(out.stdout)
    }

    fn file_close(&self, handle: i64) -> Result<()> {
        self.call("guest-file-close", Some(json!({ "handle": handle })))
            .map(|_| ())
    }

    fn read_handle(&self, path: &str, handle: i64) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        let mut empty_reads = 0;
        loop {
            let r = self
                .call(
                    "guest-file-read",
                    Some(json!({"handle": handle, "count": READ_PIECE})),
                )
                .map_err(|e| context(e, format!("reading {path} in domain {}", self.dom())))?;
            let b64 = r.get("buf-b64").and_then(Value::as_str).unwrap_or("");
            let piece = decode_b64_capped(b64, READ_PIECE).ok_or_else(|| {
                bad_reply(self.dom(), "guest-file-read", &format!("reading {path}"))
            })?;
            if let Some(count) = r.get("count").and_then(Value::as_u64) {
                if count != piece.len() as u64 {
                    return Err(bad_reply(
                        self.dom(),
                        "guest-file-read",
                        &format!("reading {path} (count {count}, {} bytes)", piece.len()),
                    ));
                }
            }
            if data.len() + piece.len() > MAX_GUEST_BYTES {
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "{path} in domain {} is larger than {} MiB, the most read from a guest",
                        self.dom(),
                        MAX_GUEST_BYTES >> 20
                    ),
                ));
            }
            let eof = r.get("eof").and_then(Value::as_bool).unwrap_or(true);
            if piece.is_empty() && !eof {
                empty_reads += 1;
                if empty_reads >= 3 {
                    return Err(bad_reply(
                        self.dom(),
                        "guest-file-read",
                        &format!("reading {path} (no data and no end of file)"),
                    ));
                }
            } else {
                empty_reads = 0;
            }
            data.extend_from_slice(&piece);
            if eof {
                return Ok(data);
            }
        }
    }

    fn write_handle(&self, path: &str, handle: i64, data: &[u8]) -> Result<()> {
        for piece in data.chunks(WRITE_PIECE) {
            let r = self
                .call(
                    "guest-file-write",
                    Some(json!({"handle": handle, "buf-b64": encode_b64(piece)})),
                )
                .map_err(|e| context(e, format!("writing {path} in domain {}", self.dom())))?;
            let count = r.get("count").and_then(Value::as_u64);
            if count != Some(piece.len() as u64) {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "short write to {path} in domain {} ({:?} of {} bytes)",
                        self.dom(),
                        count,
                        piece.len()
                    ),
                ));
            }
        }
        self.call("guest-file-flush", Some(json!({ "handle": handle })))
            .map_err(|e| context(e, format!("flushing {path} in domain {}", self.dom())))?;
        Ok(())
    }

    /// Whether `path` exists in the guest (as anything, a dangling link included).
    fn exists(&self, path: &str) -> Result<bool> {
        let out = self.exec(
            &["sh", "-c", r#"[ -e "$1" ] || [ -L "$1" ]"#, "sh", path],
            None,
            HELPER_TIMEOUT,
        )?;
        Ok(out.success())
    }

    pub(super) fn read_guest_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
        check_path(self.dom(), path)?;
        let handle = match self.call("guest-file-open", Some(json!({"path": path, "mode": "r"}))) {
            Ok(h) => h.as_i64().ok_or_else(|| {
                bad_reply(self.dom(), "guest-file-open", &format!("opening {path}"))
            })?,
            Err(e) if is_agent_down(&e) => return Err(e),
            Err(e) => {
                // The agent's error text is not a contract: ask the guest whether it exists.
                if !self.exists(path)? {
                    return Ok(None);
                }
                return Err(context(
                    e,
                    format!("cannot open {path} in domain {}", self.dom()),
                ));
            }
        };
        let data = self.read_handle(path, handle);
        let closed = self.file_close(handle);
        let data = data?;
        closed.map_err(|e| context(e, format!("closing {path} in domain {}", self.dom())))?;
        Ok(Some(data))
    }

    pub(super) fn write_guest_file(
        &self,
        path: &str,
        data: &[u8],
        mode: Option<u32>,
    ) -> Result<()> {
        check_path(self.dom(), path)?;
        if let Some(m) = mode {
            if m > 0o7777 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("mode {m:o} for {path} is not a file mode"),
                ));
            }
        }
        let mode_s = mode.map(|m| format!("{m:o}")).unwrap_or_default();
        let what = format!("writing {path}");
        if data.len() <= STDIN_WRITE_MAX {
            // One program: the bytes arrive on its stdin.
            self.helper_input(
                &what,
                &format!("{WRITE_PREPARE}\ncat > \"$t\" || fail \"cannot write\"\n{WRITE_FINISH}"),
                &[path, &mode_s],
                data,
            )?;
            return Ok(());
        }
        // Large: a temporary file made by mktemp (mode 0600; the agent would create it 0666),
        // filled through guest-file-write, then finished by a second program.
        let out = self.helper(
            &format!("preparing to write {path}"),
            &format!("{WRITE_PREPARE}\nprintf '%s\\n' \"$t\""),
            &[path, &mode_s],
        )?;
        let tmp = String::from_utf8_lossy(&out).trim_end().to_string();
        if !tmp.starts_with('/') || tmp.contains('\n') {
            return Err(bad_reply(self.dom(), "guest-exec", &what));
        }
        let written = (|| {
            let h = self
                .call("guest-file-open", Some(json!({"path": tmp, "mode": "w"})))
                .map_err(|e| context(e, format!("opening {tmp} in domain {}", self.dom())))?
                .as_i64()
                .ok_or_else(|| bad_reply(self.dom(), "guest-file-open", &tmp))?;
            let w = self.write_handle(&tmp, h, data);
            let c = self.file_close(h);
            w?;
            c.map_err(|e| context(e, format!("closing {tmp} in domain {}", self.dom())))
        })();
        if let Err(e) = written {
            let _ = self.helper("removing a temporary file", r#"rm -f -- "$1""#, &[&tmp]);
            return Err(e);
        }
        self.helper(
            &what,
            &format!("{WRITE_PREPARE_EXISTING}\n{WRITE_FINISH}"),
            &[path, &mode_s, &tmp],
        )?;
        Ok(())
    }

    pub(super) fn remove_guest_file(&self, path: &str) -> Result<()> {
        check_path(self.dom(), path)?;
        self.helper(&format!("removing {path}"), r#"rm -f -- "$1""#, &[path])
            .map(|_| ())
    }

    pub(super) fn list_guest_dir(&self, path: &str) -> Result<Vec<String>> {
        check_path(self.dom(), path)?;
        let out = self.helper(
            &format!("listing {path}"),
            r#"[ -d "$1" ] || exit 0
cd -- "$1" || exit 1
for f in * .*; do
  case $f in .|..) continue ;; esac
  if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
done"#,
            &[path],
        )?;
        let mut names: Vec<String> = out
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub(super) fn rename_guest_file(&self, from: &str, to: &str) -> Result<()> {
        check_path(self.dom(), from)?;
        check_path(self.dom(), to)?;
        self.helper(
            &format!("renaming {from} to {to}"),
            r#"mv -f -- "$1" "$2""#,
            &[from, to],
        )
        .map(|_| ())
    }
}

fn check_path(domain: &str, path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\n') || path.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("guest path {path:?} (domain {domain}) must be absolute, without newlines"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::scripted::{sent, Scripted};
    use super::*;

    #[test]
    fn read_file_reads_pieces_until_eof_and_closes() {
        let c = Scripted::new(vec![
            Ok(json!(5)),
            Ok(json!({"count": 3, "buf-b64": encode_b64(b"abc"), "eof": false})),
            Ok(json!({"count": 2, "buf-b64": encode_b64(b"de"), "eof": false})),
            Ok(json!({"count": 0, "buf-b64": "", "eof": true})),
            Ok(json!({})),
        ]);
        assert_eq!(c.read_file("/etc/x").unwrap().unwrap(), b"abcde");
        assert_eq!(
            sent(&c),
            [
                "guest-file-open",
                "guest-file-read",
                "guest-file-read",
                "guest-file-read",
                "guest-file-close"
            ]
        );
    }

    #[test]
    fn read_file_missing_is_none_and_lying_counts_fail() {
        let c = Scripted::new(vec![
            Err(Error::new(ErrorKind::Internal, "open failed")),
            Ok(json!({"pid": 1})),
            Ok(json!({"exited": true, "exitcode": 1})),
        ]);
        assert_eq!(c.read_file("/nope").unwrap(), None);

        let c = Scripted::new(vec![
            Ok(json!(5)),
            Ok(json!({"count": 9, "buf-b64": encode_b64(b"abc"), "eof": true})),
            Ok(json!({})),
        ]);
        let e = c.read_file("/etc/x").unwrap_err();
        assert!(e.to_string().contains("reading /etc/x"), "{e}");
        assert_eq!(sent(&c).last().unwrap(), "guest-file-close");

        // Endless empty reads without EOF stop.
        let mut replies = vec![Ok(json!(5))];
        for _ in 0..3 {
            replies.push(Ok(json!({"count": 0, "buf-b64": "", "eof": false})));
        }
        replies.push(Ok(json!({})));
        let c = Scripted::new(replies);
        assert!(c.read_file("/etc/x").is_err());

        // The agent down is not "file missing".
        let c = Scripted::new(vec![Err(Error::new(
            ErrorKind::FailedPrecondition,
            "domain dom1 has no responding guest agent",
        ))]);
        assert_eq!(
            c.read_file("/x").unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
    }

    #[test]
    fn reads_are_capped() {
        let big = encode_b64(&vec![0u8; READ_PIECE]);
        let mut replies = vec![Ok(json!(5))];
        for _ in 0..(MAX_GUEST_BYTES / READ_PIECE + 1) {
            replies.push(Ok(
                json!({"count": READ_PIECE, "buf-b64": big.clone(), "eof": false}),
            ));
        }
        replies.push(Ok(json!({})));
        let c = Scripted::new(replies);
        let e = c.read_file("/var/huge").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(e
            .to_string()
            .contains("/var/huge in domain dom1 is larger than 64 MiB"));
    }

    #[test]
    fn paths_are_checked() {
        let c = Scripted::new(vec![]);
        assert_eq!(
            c.read_file("etc/x").unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            c.write_file("/a\nb", b"", None).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
