//! Unit tests of the NBD client against a scripted fake server over an in-memory pipe:
//! the bounds checks a hostile or broken server must hit, reply reassembly, request
//! splitting and the loop of `allocation_map`. Real servers are exercised in
//! `tests/it/nbd_client.rs`.

use std::time::Duration;

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::proto::*;
use super::*;

const SIZE: u64 = 1 << 20;

/// Server side of one option request: (option, data).
async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
    let opt = s.read_u32().await.unwrap();
    let len = s.read_u32().await.unwrap();
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await.unwrap();
    (opt, data)
}

async fn option_reply(s: &mut DuplexStream, opt: u32, kind: u32, payload: &[u8]) {
    s.write_u64(OPTION_REPLY_MAGIC).await.unwrap();
    s.write_u32(opt).await.unwrap();
    s.write_u32(kind).await.unwrap();
    s.write_u32(payload.len() as u32).await.unwrap();
    s.write_all(payload).await.unwrap();
}

async fn greet(s: &mut DuplexStream) {
    s.write_u64(NBDMAGIC).await.unwrap();
    s.write_u64(IHAVEOPT).await.unwrap();
    s.write_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .await
        .unwrap();
    assert_eq!(
        s.read_u32().await.unwrap(),
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
}

/// A well-behaved handshake: structured replies, `base:allocation` as id 7 (and
/// `x-other:ctx` as id 9 when asked), export of `SIZE` bytes, optional block sizes.
async fn serve_handshake(s: &mut DuplexStream, block: Option<(u32, u32, u32)>) {
    greet(s).await;
    loop {
        let (opt, data) = read_option(s).await;
        match opt {
            OPT_STRUCTURED_REPLY => option_reply(s, opt, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                for (name, id) in [(BASE_ALLOCATION, 7u32), ("x-other:ctx", 9)] {
                    if data.windows(name.len()).any(|w| w == name.as_bytes()) {
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(name.as_bytes());
                        option_reply(s, opt, REP_META_CONTEXT, &p).await;
                    }
                }
                option_reply(s, opt, REP_ACK, &[]).await;
            }
            OPT_GO => {
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&SIZE.to_be_bytes());
                p.extend_from_slice(&(NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY).to_be_bytes());
                option_reply(s, opt, REP_INFO, &p).await;
                if let Some((min, pref, max)) = block {
                    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [min, pref, max] {
                        p.extend_from_slice(&v.to_be_bytes());
                    }
                    option_reply(s, opt, REP_INFO, &p).await;
                }
                option_reply(s, opt, REP_ACK, &[]).await;
                return;
            }
            other => panic!("unexpected option {other}"),
        }
    }
}

/// Server side of one request: (command, cookie, offset, length).
async fn read_request(s: &mut DuplexStream) -> (u16, u64, u64, u32) {
    assert_eq!(s.read_u32().await.unwrap(), REQUEST_MAGIC);
    let _flags = s.read_u16().await.unwrap();
    let cmd = s.read_u16().await.unwrap();
    let cookie = s.read_u64().await.unwrap();
    let offset = s.read_u64().await.unwrap();
    let len = s.read_u32().await.unwrap();
    (cmd, cookie, offset, len)
}

/// Writes a structured reply chunk header claiming `length` bytes, then `payload`.
async fn chunk_with_length(
    s: &mut DuplexStream,
    flags: u16,
    kind: u16,
    cookie: u64,
    length: u32,
    payload: &[u8],
) {
    s.write_u32(STRUCTURED_REPLY_MAGIC).await.unwrap();
    s.write_u16(flags).await.unwrap();
    s.write_u16(kind).await.unwrap();
    s.write_u64(cookie).await.unwrap();
    s.write_u32(length).await.unwrap();
    s.write_all(payload).await.unwrap();
}

async fn chunk(s: &mut DuplexStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    chunk_with_length(s, flags, kind, cookie, payload.len() as u32, payload).await;
}

fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

fn hole_payload(offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p
}

fn status_payload(id: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let mut p = id.to_be_bytes().to_vec();
    for (len, flags) in descriptors {
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
    }
    p
}

fn error_payload(errno: u32, msg: &str, offset: Option<u64>) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    if let Some(o) = offset {
        p.extend_from_slice(&o.to_be_bytes());
    }
    p
}

const DONE: u16 = REPLY_FLAG_DONE;

fn alloc_opts() -> ConnectOptions {
    ConnectOptions::new("").with_meta_context(BASE_ALLOCATION)
}

/// Starts a fake server running `script` after a normal handshake, and connects to it.
async fn connect_to<F, Fut>(block: Option<(u32, u32, u32)>, script: F) -> NbdClient
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    connect_to_joinable(block, script).await.0
}

/// Like [`connect_to`], also returning the server task, to check its assertions.
async fn connect_to_joinable<F, Fut>(
    block: Option<(u32, u32, u32)>,
    script: F,
) -> (NbdClient, tokio::task::JoinHandle<()>)
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (client_end, mut server_end) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        serve_handshake(&mut server_end, block).await;
        script(server_end).await;
    });
    let client = NbdClient::connect_stream(client_end, &alloc_opts())
        .await
        .expect("handshake");
    (client, server)
}

fn assert_protocol(err: &NbdError, needle: &str) {
    match err {
        NbdError::Protocol(msg) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
        other => panic!("expected a protocol violation about {needle:?}, got {other:?}"),
    }
}

// ---- handshake -------------------------------------------------------------------------

#[tokio::test]
async fn handshake_records_size_flags_contexts_and_block_size() {
    let client = connect_to(Some((512, 4096, 1 << 20)), |_s| async {}).await;
    assert_eq!(client.size(), SIZE);
    assert!(client.is_read_only());
    assert_eq!(client.meta_contexts(), [(BASE_ALLOCATION.to_string(), 7)]);
    let bs = client.block_size();
    assert_eq!(
        (bs.minimum, bs.preferred, bs.maximum, bs.advertised),
        (512, 4096, 1 << 20, true)
    );
}

#[tokio::test]
async fn oversized_option_reply_is_rejected_without_reading_it() {
    let (c, mut s) = duplex(4096);
    tokio::spawn(async move {
        greet(&mut s).await;
        let (opt, _) = read_option(&mut s).await;
        // Claims 1 GiB of payload; sends none.
        s.write_u64(OPTION_REPLY_MAGIC).await.unwrap();
        s.write_u32(opt).await.unwrap();
        s.write_u32(REP_ACK).await.unwrap();
        s.write_u32(1 << 30).await.unwrap();
        std::future::pending::<()>().await;
    });
    let err = NbdClient::connect_stream(c, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert_protocol(&err, "limit 65536");
}

#[tokio::test]
async fn refused_structured_replies_name_the_option() {
    let (c, mut s) = duplex(4096);
    let server = tokio::spawn(async move {
        greet(&mut s).await;
        let (opt, _) = read_option(&mut s).await;
        option_reply(&mut s, opt, REP_FLAG_ERROR | 1, b"not here").await;
        // The client aborts politely.
        let (opt, _) = read_option(&mut s).await;
        assert_eq!(opt, OPT_ABORT);
    });
    let err = NbdClient::connect_stream(c, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NbdError::OptionRefused { option: "NBD_OPT_STRUCTURED_REPLY", message, .. } if message == "not here"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("NBD_REP_ERR_UNSUP") && text.contains("not here"),
        "{text}"
    );
    server.await.expect("server saw NBD_OPT_ABORT");
}

#[tokio::test]
async fn go_without_export_info_is_a_protocol_violation() {
    let (c, mut s) = duplex(4096);
    tokio::spawn(async move {
        greet(&mut s).await;
        let (opt, _) = read_option(&mut s).await;
        option_reply(&mut s, opt, REP_ACK, &[]).await;
        let (opt, _) = read_option(&mut s).await;
        option_reply(&mut s, opt, REP_ACK, &[]).await;
    });
    let err = NbdClient::connect_stream(c, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert_protocol(&err, "NBD_INFO_EXPORT");
}

#[tokio::test]
async fn invalid_block_size_constraints_are_rejected() {
    let (c, mut s) = duplex(4096);
    tokio::spawn(async move { serve_handshake(&mut s, Some((3, 4096, 1 << 20))).await });
    let err = NbdClient::connect_stream(c, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert_protocol(&err, "block size");
}

#[tokio::test]
async fn oldstyle_and_non_nbd_servers_are_rejected() {
    let (c, mut s) = duplex(4096);
    tokio::spawn(async move {
        s.write_u64(NBDMAGIC).await.unwrap();
        s.write_u64(OLDSTYLE_MAGIC).await.unwrap();
        s.write_u16(0).await.unwrap();
    });
    let err = NbdClient::connect_stream(c, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert_protocol(&err, "oldstyle");

    let (c, mut s) = duplex(4096);
    tokio::spawn(async move { s.write_all(b"HTTP/1.1 400 Bad Request\r\n").await.unwrap() });
    let err = NbdClient::connect_stream(c, &ConnectOptions::default())
        .await
        .unwrap_err();
    assert_protocol(&err, "NBDMAGIC");
}

#[tokio::test]
async fn bad_names_are_refused_before_sending() {
    let (c, _s) = duplex(4096);
    let err = NbdClient::connect_stream(c, &ConnectOptions::new("").with_meta_context("nocolon"))
        .await
        .unwrap_err();
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
}

// ---- reads -----------------------------------------------------------------------------

#[tokio::test]
async fn out_of_order_chunks_and_holes_are_reassembled() {
    let mut client = connect_to(None, |mut s| async move {
        let (cmd, cookie, off, len) = read_request(&mut s).await;
        assert_eq!((cmd, off, len), (CMD_READ, 4096, 4096));
        chunk(
            &mut s,
            0,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_payload(4096 + 2048, &[3; 2048]),
        )
        .await;
        chunk(
            &mut s,
            0,
            REPLY_TYPE_OFFSET_HOLE,
            cookie,
            &hole_payload(4096, 1024),
        )
        .await;
        chunk(
            &mut s,
            DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_payload(4096 + 1024, &[2; 1024]),
        )
        .await;
    })
    .await;
    let mut buf = vec![0xffu8; 4096];
    client.read(4096, &mut buf).await.expect("read");
    assert!(buf[..1024].iter().all(|&b| b == 0));
    assert!(buf[1024..2048].iter().all(|&b| b == 2));
    assert!(buf[2048..].iter().all(|&b| b == 3));
}

#[tokio::test]
async fn reads_are_split_at_the_servers_maximum_block_size() {
    let (mut client, server) = connect_to_joinable(Some((512, 4096, 4096)), |mut s| async move {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (_, cookie, off, len) = read_request(&mut s).await;
            seen.push((off, len));
            let data: Vec<u8> = (off..off + u64::from(len))
                .map(|i| (i % 251) as u8)
                .collect();
            chunk(
                &mut s,
                DONE,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                &data_payload(off, &data),
            )
            .await;
        }
        assert_eq!(seen, [(512, 4096), (4608, 4096), (8704, 1024)]);
    })
    .await;
    let mut buf = vec![0u8; 9216];
    client.read(512, &mut buf).await.expect("split read");
    assert!(buf
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((512 + i as u64) % 251) as u8));
    server.await.expect("server saw the expected requests");
    let err = client.read(100, &mut buf[..512]).await.unwrap_err();
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
}

#[tokio::test]
async fn data_chunk_outside_the_request_is_rejected_and_poisons_the_client() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk(
            &mut s,
            DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_payload(8192, &[1; 16]),
        )
        .await;
        std::future::pending::<()>().await;
    })
    .await;
    let mut buf = vec![0u8; 4096];
    let err = client.read(0, &mut buf).await.unwrap_err();
    assert_protocol(&err, "outside the request");
    assert!(!err.connection_usable());
    assert!(matches!(
        client.read(0, &mut buf).await,
        Err(NbdError::Unusable)
    ));
}

#[tokio::test]
async fn huge_chunk_length_is_rejected_before_reading() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        // Claims almost 4 GiB of data for a 4 KiB read.
        chunk_with_length(
            &mut s,
            DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            u32::MAX,
            &0u64.to_be_bytes(),
        )
        .await;
        std::future::pending::<()>().await;
    })
    .await;
    let mut buf = vec![0u8; 4096];
    let err = client.read(0, &mut buf).await.unwrap_err();
    assert_protocol(&err, "outside the request");
}

#[tokio::test]
async fn overlapping_chunks_are_rejected() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk(
            &mut s,
            0,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_payload(0, &[1; 3000]),
        )
        .await;
        chunk(
            &mut s,
            DONE,
            REPLY_TYPE_OFFSET_HOLE,
            cookie,
            &hole_payload(2048, 2048),
        )
        .await;
    })
    .await;
    let mut buf = vec![0u8; 4096];
    let err = client.read(0, &mut buf).await.unwrap_err();
    assert_protocol(&err, "overlaps");
}

#[tokio::test]
async fn success_without_all_the_data_is_rejected() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk(
            &mut s,
            0,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_payload(0, &[1; 1024]),
        )
        .await;
        chunk(&mut s, DONE, REPLY_TYPE_NONE, cookie, &[]).await;
    })
    .await;
    let mut buf = vec![0u8; 4096];
    let err = client.read(0, &mut buf).await.unwrap_err();
    assert_protocol(&err, "only 1024 bytes");
}

#[tokio::test]
async fn reply_for_another_cookie_is_rejected() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk(&mut s, DONE, REPLY_TYPE_NONE, cookie + 1, &[]).await;
    })
    .await;
    let mut buf = vec![0u8; 512];
    let err = client.read(0, &mut buf).await.unwrap_err();
    assert_protocol(&err, "cookie");
}

#[tokio::test]
async fn error_chunks_are_reported_and_the_client_stays_usable() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, off, _) = read_request(&mut s).await;
        chunk(
            &mut s,
            0,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_payload(off, &[1; 512]),
        )
        .await;
        let p = error_payload(5, "disk on fire", Some(off + 512));
        chunk(&mut s, 0, REPLY_TYPE_ERROR_OFFSET, cookie, &p).await;
        chunk(&mut s, DONE, REPLY_TYPE_NONE, cookie, &[]).await;
        let (_, cookie, off, len) = read_request(&mut s).await;
        chunk(
            &mut s,
            DONE,
            REPLY_TYPE_OFFSET_DATA,
            cookie,
            &data_payload(off, &vec![9; len as usize]),
        )
        .await;
    })
    .await;
    let mut buf = vec![0u8; 1024];
    let err = client.read(2048, &mut buf).await.unwrap_err();
    match &err {
        NbdError::Server {
            command,
            errno,
            message,
            offset,
            length,
            error_offset,
        } => {
            assert_eq!(
                (*command, *errno, message.as_str()),
                ("NBD_CMD_READ", 5, "disk on fire")
            );
            assert_eq!((*offset, *length, *error_offset), (2048, 1024, Some(2560)));
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "NBD server failed NBD_CMD_READ at offset 2048, length 1024: EIO (at offset 2560): \
         server says \"disk on fire\""
    );
    client.read(0, &mut buf).await.expect("next read works");
    assert!(buf.iter().all(|&b| b == 9));
}

#[tokio::test]
async fn error_message_longer_than_its_chunk_is_rejected() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&60000u16.to_be_bytes());
        chunk(&mut s, DONE, REPLY_TYPE_ERROR, cookie, &p).await;
    })
    .await;
    let mut buf = vec![0u8; 512];
    let err = client.read(0, &mut buf).await.unwrap_err();
    assert_protocol(&err, "does not fit");
}

#[tokio::test]
async fn cancelled_request_leaves_the_client_unusable() {
    let mut client = connect_to(None, |mut s| async move {
        let _ = read_request(&mut s).await;
        std::future::pending::<()>().await; // never answers
    })
    .await;
    let mut buf = vec![0u8; 512];
    let timed_out = tokio::time::timeout(Duration::from_millis(50), client.read(0, &mut buf)).await;
    assert!(timed_out.is_err());
    assert!(matches!(
        client.read(0, &mut buf).await,
        Err(NbdError::Unusable)
    ));
}

// ---- block status ----------------------------------------------------------------------

#[tokio::test]
async fn short_block_status_answers_are_looped_and_merged() {
    let mut client = connect_to(None, |mut s| async move {
        // Each answer covers only 1024 bytes; flags 0, 0, 3, 3, 0 over 5 KiB.
        for flags in [0u32, 0, 3, 3, 0] {
            let (cmd, cookie, off, len) = read_request(&mut s).await;
            assert_eq!(cmd, CMD_BLOCK_STATUS);
            assert_eq!(off + u64::from(len), 5120);
            chunk(
                &mut s,
                DONE,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                &status_payload(7, &[(1024, flags)]),
            )
            .await;
        }
    })
    .await;
    let map = client
        .allocation_map(BASE_ALLOCATION, 0, 5120)
        .await
        .expect("map");
    assert_eq!(
        map,
        [
            Extent {
                offset: 0,
                length: 2048,
                flags: 0
            },
            Extent {
                offset: 2048,
                length: 2048,
                flags: 3
            },
            Extent {
                offset: 4096,
                length: 1024,
                flags: 0
            },
        ]
    );
}

#[tokio::test]
async fn block_status_picks_its_context_and_clamps_the_last_extent() {
    let (c, mut s) = duplex(1 << 16);
    tokio::spawn(async move {
        serve_handshake(&mut s, None).await;
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk(
            &mut s,
            0,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            &status_payload(9, &[(65536, 1)]),
        )
        .await;
        // The final extent runs past the 8 KiB asked for.
        let p = status_payload(7, &[(4096, 0), (65536, 3)]);
        chunk(&mut s, DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &p).await;
    });
    let opts = alloc_opts().with_meta_context("x-other:ctx");
    let mut client = NbdClient::connect_stream(c, &opts)
        .await
        .expect("handshake");
    let ext = client
        .block_status(0, 8192, BASE_ALLOCATION)
        .await
        .expect("block status");
    assert_eq!(
        ext,
        [
            Extent {
                offset: 0,
                length: 4096,
                flags: 0
            },
            Extent {
                offset: 4096,
                length: 4096,
                flags: 3
            }
        ]
    );
}

#[tokio::test]
async fn chunks_for_contexts_the_server_added_are_skipped() {
    let (c, mut s) = duplex(1 << 16);
    tokio::spawn(async move {
        greet(&mut s).await;
        loop {
            let (opt, _) = read_option(&mut s).await;
            match opt {
                OPT_SET_META_CONTEXT => {
                    for (name, id) in [("x-extra:thing", 3u32), (BASE_ALLOCATION, 4)] {
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(name.as_bytes());
                        option_reply(&mut s, opt, REP_META_CONTEXT, &p).await;
                    }
                    option_reply(&mut s, opt, REP_ACK, &[]).await;
                }
                OPT_GO => {
                    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                    p.extend_from_slice(&SIZE.to_be_bytes());
                    p.extend_from_slice(&NBD_FLAG_HAS_FLAGS.to_be_bytes());
                    option_reply(&mut s, opt, REP_INFO, &p).await;
                    option_reply(&mut s, opt, REP_ACK, &[]).await;
                    break;
                }
                _ => option_reply(&mut s, opt, REP_ACK, &[]).await,
            }
        }
        let (_, cookie, _, len) = read_request(&mut s).await;
        chunk(
            &mut s,
            0,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            &status_payload(3, &[(len, 1)]),
        )
        .await;
        let p = status_payload(4, &[(len, 0)]);
        chunk(&mut s, DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &p).await;
    });
    let mut client = NbdClient::connect_stream(c, &alloc_opts())
        .await
        .expect("handshake");
    assert_eq!(client.meta_contexts(), [(BASE_ALLOCATION.to_string(), 4)]);
    let ext = client
        .block_status(0, 4096, BASE_ALLOCATION)
        .await
        .expect("block status");
    assert_eq!(
        ext,
        [Extent {
            offset: 0,
            length: 4096,
            flags: 0
        }]
    );
}

#[tokio::test]
async fn block_status_descriptors_past_the_range_are_rejected() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        let p = status_payload(7, &[(8192, 0), (512, 3)]);
        chunk(&mut s, DONE, REPLY_TYPE_BLOCK_STATUS, cookie, &p).await;
    })
    .await;
    let err = client
        .block_status(0, 4096, BASE_ALLOCATION)
        .await
        .unwrap_err();
    assert_protocol(&err, "past the requested range");
}

#[tokio::test]
async fn zero_length_descriptor_is_rejected() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk(
            &mut s,
            DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            &status_payload(7, &[(0, 0)]),
        )
        .await;
    })
    .await;
    let err = client
        .block_status(0, 4096, BASE_ALLOCATION)
        .await
        .unwrap_err();
    assert_protocol(&err, "length zero");
}

#[tokio::test]
async fn block_status_for_an_unknown_context_id_is_rejected() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk(
            &mut s,
            DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            &status_payload(42, &[(4096, 0)]),
        )
        .await;
    })
    .await;
    let err = client
        .block_status(0, 4096, BASE_ALLOCATION)
        .await
        .unwrap_err();
    assert_protocol(&err, "never selected");
}

#[tokio::test]
async fn oversized_block_status_chunk_is_rejected_before_reading() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk_with_length(
            &mut s,
            DONE,
            REPLY_TYPE_BLOCK_STATUS,
            cookie,
            4 + 8 * (1 << 24),
            &[],
        )
        .await;
        std::future::pending::<()>().await;
    })
    .await;
    let err = client
        .block_status(0, 4096, BASE_ALLOCATION)
        .await
        .unwrap_err();
    assert_protocol(&err, "descriptors");
}

#[tokio::test]
async fn block_status_without_our_context_is_rejected() {
    let mut client = connect_to(None, |mut s| async move {
        let (_, cookie, _, _) = read_request(&mut s).await;
        chunk(&mut s, DONE, REPLY_TYPE_NONE, cookie, &[]).await;
    })
    .await;
    let err = client
        .block_status(0, 4096, BASE_ALLOCATION)
        .await
        .unwrap_err();
    assert_protocol(&err, "without extents");
}

#[tokio::test]
async fn disconnect_sends_nbd_cmd_disc() {
    let (c, mut s) = duplex(1 << 16);
    let server = tokio::spawn(async move {
        serve_handshake(&mut s, None).await;
        let (cmd, _, off, len) = read_request(&mut s).await;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        (cmd, off, len, rest.len())
    });
    let client = NbdClient::connect_stream(c, &ConnectOptions::default())
        .await
        .expect("handshake");
    client.disconnect().await.expect("disconnect");
    assert_eq!(server.await.unwrap(), (CMD_DISC, 0, 0, 0));
}
