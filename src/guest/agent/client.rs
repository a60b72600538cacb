//! The guest agent protocol: [`QgaClient`] sends commands over a [`QgaTransport`], parses the
//! replies, runs programs (`guest-exec`, polling `guest-exec-status`) and implements
//! [`GuestAgent`]; base64 as the agent speaks it, decoded strictly and with a size cap.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use super::{
    ExecOutput, FreezeStatus, GuestAgent, NetInterface, OsInfo, QgaTransport,
    DEFAULT_COMMAND_TIMEOUT, MAX_GUEST_BYTES, WRITE_PIECE,
};
use crate::error::{Error, ErrorKind, Result};

/// The guest agent protocol over a [`QgaTransport`].
pub struct QgaClient<T> {
    transport: T,
    timeout: Duration,
}

impl<T: QgaTransport> QgaClient<T> {
    /// A client over `transport`, allowing [`DEFAULT_COMMAND_TIMEOUT`] per command.
    pub fn with_transport(transport: T) -> Self {
        QgaClient {
            transport,
            timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
    /// The time allowed for each agent command (not for a whole `exec`); at least 1 s.
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_secs(1));
        self
    }
    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub(super) fn call(&self, execute: &str, arguments: Option<Value>) -> Result<Value> {
        let cmd = match arguments {
            Some(a) => json!({"execute": execute, "arguments": a}),
            None => json!({ "execute": execute }),
        };
        self.transport.call(&cmd, self.timeout)
    }

    pub(super) fn dom(&self) -> &str {
        self.transport.domain()
    }

    fn poll_exec(&self, argv: &[&str], pid: i64, timeout: Duration) -> Result<ExecOutput> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            let r = self.call("guest-exec-status", Some(json!({ "pid": pid })))?;
            if r.get("exited").and_then(Value::as_bool) == Some(true) {
                return self.exec_result(argv, &r);
            }
            if start.elapsed() >= timeout {
                // Best effort: do not leave it running (Linux guests; errors ignored).
                let _ = self.call(
                    "guest-exec",
                    Some(json!({
                        "path": "sh",
                        "arg": ["-c", "kill -KILL \"$1\"", "sh", pid.to_string()]
                    })),
                );
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "`{}` did not finish within {}s in domain {} (guest pid {pid}, killed)",
                        argv.join(" "),
                        timeout.as_secs(),
                        self.dom()
                    ),
                ));
            }
            std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
            pause = (pause * 3 / 2).min(Duration::from_millis(100));
        }
    }

    fn exec_result(&self, argv: &[&str], r: &Value) -> Result<ExecOutput> {
        let prog = argv.first().copied().unwrap_or("");
        for (flag, stream) in [("out-truncated", "stdout"), ("err-truncated", "stderr")] {
            if r.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "the {stream} of `{prog}` in domain {} was truncated by the guest agent \
                         (too large); its partial output was not used",
                        self.dom()
                    ),
                ));
            }
        }
        let data = |key: &str| -> Result<Vec<u8>> {
            match r.get(key).and_then(Value::as_str) {
                None => Ok(Vec::new()),
                Some(b) => decode_b64_capped(b, MAX_GUEST_BYTES).ok_or_else(|| {
                    bad_reply(self.dom(), "guest-exec-status", &format!("`{prog}` {key}"))
                }),
            }
        };
        let signal = r
            .get("signal")
            .and_then(Value::as_i64)
            .map(|s| s.clamp(0, 127) as i32);
        let exit_code = match (r.get("exitcode").and_then(Value::as_i64), signal) {
            (Some(c), _) => c.clamp(i32::MIN as i64, i32::MAX as i64) as i32,
            (None, Some(s)) => 128 + s,
            (None, None) => -1,
        };
        Ok(ExecOutput {
            exit_code,
            signal,
            stdout: data("out-data")?,
            stderr: data("err-data")?,
        })
    }
}

impl<T: QgaTransport> GuestAgent for QgaClient<T> {
    fn domain(&self) -> &str {
        self.dom()
    }

    fn ping(&self) -> Result<()> {
        self.call("guest-ping", None).map(|_| ())
    }

    fn os_info(&self) -> Result<OsInfo> {
        let r = self.call("guest-get-osinfo", None)?;
        let s = |k: &str| {
            r.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .chars()
                .take(256)
                .collect::<String>()
        };
        let id = s("id");
        Ok(OsInfo {
            is_windows: id.eq_ignore_ascii_case("mswindows"),
            id,
            name: s("name"),
            version_id: s("version-id"),
            kernel: s("kernel-release"),
        })
    }

    fn network_interfaces(&self) -> Result<Vec<NetInterface>> {
        let r = self.call("guest-network-get-interfaces", None)?;
        let list = r
            .as_array()
            .ok_or_else(|| bad_reply(self.dom(), "guest-network-get-interfaces", "interfaces"))?;
        Ok(list
            .iter()
            .filter_map(|i| {
                let name = i.get("name")?.as_str()?.to_string();
                let hardware_address = i
                    .get("hardware-address")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let ip_addresses = i
                    .get("ip-addresses")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|ip| {
                                let addr = ip.get("ip-address")?.as_str()?;
                                Some(match ip.get("prefix").and_then(Value::as_u64) {
                                    Some(p) => format!("{addr}/{p}"),
                                    None => addr.to_string(),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(NetInterface {
                    name,
                    hardware_address,
                    ip_addresses,
                })
            })
            .collect())
    }

    fn exec(&self, argv: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<ExecOutput> {
        let Some((path, args)) = argv.split_first() else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "guest-exec needs a program",
            ));
        };
        if stdin.is_some_and(|i| i.len() > WRITE_PIECE) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "input for `{path}` in domain {} is larger than {} KiB, the most one guest \
                     agent command carries",
                    self.dom(),
                    WRITE_PIECE >> 10
                ),
            ));
        }
        let mut a = json!({"path": path, "arg": args, "capture-output": true});
        if let Some(input) = stdin {
            a["input-data"] = Value::String(encode_b64(input));
        }
        let r = self
            .call("guest-exec", Some(a))
            .map_err(|e| context(e, format!("starting `{path}` in domain {}", self.dom())))?;
        let pid = r
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad_reply(self.dom(), "guest-exec", &format!("`{path}`")))?;
        self.poll_exec(argv, pid, timeout)
    }

    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
        self.read_guest_file(path)
    }

    fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<()> {
        self.write_guest_file(path, data, mode)
    }

    fn remove_file(&self, path: &str) -> Result<()> {
        self.remove_guest_file(path)
    }

    fn list_dir(&self, path: &str) -> Result<Vec<String>> {
        self.list_guest_dir(path)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        self.rename_guest_file(from, to)
    }

    fn fsfreeze_status(&self) -> Result<FreezeStatus> {
        let r = self.call("guest-fsfreeze-status", None)?;
        Ok(match r.as_str() {
            Some("thawed") => FreezeStatus::Thawed,
            _ => FreezeStatus::Frozen,
        })
    }

    fn fsfreeze_thaw(&self) -> Result<u32> {
        let r = self.call("guest-fsfreeze-thaw", None)?;
        r.as_u64()
            .map(|n| n.min(u32::MAX as u64) as u32)
            .ok_or_else(|| bad_reply(self.dom(), "guest-fsfreeze-thaw", "filesystems thawed"))
    }
}

/// The `return` member of an agent reply; an `error` member becomes an error.
pub fn parse_reply(domain: &str, execute: &str, reply: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(reply).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("the guest agent of domain {domain} sent a malformed reply to {execute}"),
        )
        .with_source(e)
    })?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    if let Some(err) = v.get("error") {
        let class = err.get("class").and_then(Value::as_str).unwrap_or("error");
        return Err(Error::new(
            ErrorKind::Internal,
            format!(
                "the guest agent of domain {domain} refused {execute} ({})",
                class.chars().take(64).collect::<String>()
            ),
        ));
    }
    Err(Error::new(
        ErrorKind::Internal,
        format!("the guest agent of domain {domain} sent no result for {execute}"),
    ))
}

/// Errors meaning the agent cannot be talked to at all (as opposed to a command it refused).
pub(super) fn is_agent_down(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::FailedPrecondition | ErrorKind::Unavailable | ErrorKind::NotFound
    )
}

/// Adds what we were doing to a failed command; errors that say the agent is unreachable
/// already name the domain and are passed on as they are.
pub(super) fn context(e: Error, what: String) -> Error {
    if is_agent_down(&e) {
        e
    } else {
        Error::new(e.kind(), what).with_source(e)
    }
}

pub(super) fn bad_reply(domain: &str, execute: &str, what: &str) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!("the guest agent of domain {domain} sent an invalid {execute} reply ({what})"),
    )
}

pub(super) fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("").trim();
    if l.is_empty() {
        "no message".to_string()
    } else {
        l.chars().take(300).collect()
    }
}

/// Standard base64 as the agent speaks it: padding optional on input, trailing bits must be
/// zero.
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Standard base64 with padding.
pub fn encode_b64(data: &[u8]) -> String {
    B64.encode(data)
}

/// Strict standard base64 (padding optional, ASCII whitespace ignored); `None` when malformed
/// or when it would decode to more than `max` bytes. The length is checked before anything is
/// decoded.
pub fn decode_b64_capped(text: &str, max: usize) -> Option<Vec<u8>> {
    if text.len() / 4 * 3 > max + 3 {
        return None;
    }
    let is_space = |b: u8| matches!(b, b' ' | b'\n' | b'\r' | b'\t');
    let out = if text.bytes().any(is_space) {
        let packed: Vec<u8> = text.bytes().filter(|&b| !is_space(b)).collect();
        B64.decode(packed)
    } else {
        B64.decode(text)
    }
    .ok()?;
    (out.len() <= max).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::super::scripted::Scripted;
    use super::*;

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            &[0, 255, 128, 7],
        ] {
            assert_eq!(decode_b64_capped(&encode_b64(data), 100).unwrap(), data);
        }
        assert_eq!(encode_b64(b"foobar"), "Zm9vYmFy");
        assert_eq!(decode_b64_capped("Zm9v\nYmFy\n", 100).unwrap(), b"foobar");
        assert!(decode_b64_capped("Zm9v!", 100).is_none());
        assert!(decode_b64_capped("Zm=9v", 100).is_none());
        assert!(decode_b64_capped("Zg==", 100).is_some());
        assert!(
            decode_b64_capped("Zh==", 100).is_none(),
            "non-zero leftover bits"
        );
        assert!(decode_b64_capped(&encode_b64(&[1u8; 100]), 99).is_none());
        assert!(decode_b64_capped(&"A".repeat(1000), 10).is_none());
    }

    #[test]
    fn exec_polls_until_exit_and_decodes_output() {
        let c = Scripted::new(vec![
            Ok(json!({"pid": 42})),
            Ok(json!({"exited": false})),
            Ok(
                json!({"exited": true, "exitcode": 3, "out-data": encode_b64(b"hi\n"),
                       "err-data": encode_b64(b"oops\n")}),
            ),
        ]);
        let out = c
            .exec(&["sh", "-c", "x"], Some(b"in"), Duration::from_secs(5))
            .unwrap();
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr_text(), "oops");
        assert!(!out.success());
        let first = c.transport().sent.lock().unwrap()[0].clone();
        assert_eq!(first["arguments"]["input-data"], encode_b64(b"in"));
        assert_eq!(first["arguments"]["arg"], json!(["-c", "x"]));
    }

    #[test]
    fn exec_refuses_truncated_output() {
        let c = Scripted::new(vec![
            Ok(json!({"pid": 1})),
            Ok(json!({"exited": true, "exitcode": 0, "out-data": "aGk=", "out-truncated": true})),
        ]);
        let e = c
            .exec(&["lsblk"], None, Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(
            e.to_string()
                .contains("stdout of `lsblk` in domain dom1 was truncated"),
            "{e}"
        );
    }

    #[test]
    fn exec_signal_and_bad_base64() {
        let c = Scripted::new(vec![
            Ok(json!({"pid": 1})),
            Ok(json!({"exited": true, "signal": 9})),
            Ok(json!({"pid": 2})),
            Ok(json!({"exited": true, "exitcode": 0, "out-data": "%%%"})),
        ]);
        let out = c.exec(&["x"], None, Duration::from_secs(5)).unwrap();
        assert_eq!((out.exit_code, out.signal), (137, Some(9)));
        let e = c.exec(&["x"], None, Duration::from_secs(5)).unwrap_err();
        assert!(
            e.to_string().contains("invalid guest-exec-status reply"),
            "{e}"
        );
    }

    #[test]
    fn exec_times_out_and_kills() {
        let c = Scripted::new(vec![
            Ok(json!({"pid": 7})),
            Ok(json!({"exited": false})),
            Ok(json!({"pid": 8})),
        ]);
        let e = c.exec(&["sleep", "9"], None, Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("`sleep 9` did not finish"), "{e}");
        let last = c.transport().sent.lock().unwrap().last().unwrap().clone();
        assert_eq!(
            last["arguments"]["arg"],
            json!(["-c", "kill -KILL \"$1\"", "sh", "7"])
        );
    }

    #[test]
    fn replies_are_parsed() {
        assert_eq!(
            parse_reply("d", "x", r#"{"return":{"a":1}}"#).unwrap()["a"],
            1
        );
        let e =
            parse_reply("d", "guest-ping", r#"{"error":{"class":"GenericError"}}"#).unwrap_err();
        assert!(e.to_string().contains("refused guest-ping (GenericError)"));
        assert!(parse_reply("d", "x", "nope").is_err());
        assert!(parse_reply("d", "x", "{}").is_err());
    }

    #[test]
    fn os_info_detects_windows() {
        let c = Scripted::new(vec![Ok(
            json!({"id": "mswindows", "name": "Microsoft Windows", "version-id": "2019",
                   "kernel-release": "17763"}),
        )]);
        let i = c.os_info().unwrap();
        assert!(i.is_windows);
        assert_eq!(i.version_id, "2019");
    }

    #[test]
    fn freeze_status_and_thaw_are_typed() {
        let c = Scripted::new(vec![
            Ok(json!("thawed")),
            Ok(json!("frozen")),
            Ok(json!(2)),
            Ok(json!("two")),
        ]);
        assert_eq!(c.fsfreeze_status().unwrap(), FreezeStatus::Thawed);
        assert_eq!(c.fsfreeze_status().unwrap(), FreezeStatus::Frozen);
        assert_eq!(c.fsfreeze_thaw().unwrap(), 2);
        assert!(c.fsfreeze_thaw().is_err());
    }
}
