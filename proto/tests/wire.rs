//! Protocol tests over in-memory pipes: every message round-trips, and every kind of bad
//! input gives a typed error rather than a panic.

use std::time::Duration;

use proptest::prelude::*;
use tinyci_proto::*;
use tokio::io::{duplex, AsyncWriteExt};
use tokio_util::bytes::BytesMut;
use tokio_util::codec::Decoder;

fn sha(n: u8) -> CommitId {
    CommitId::parse(&format!("{:040x}", n as u128 * 0x1234_5678_9abc_def1)).unwrap()
}

fn report() -> RunReport {
    RunReport {
        status: RunStatus::Failure,
        steps: vec![
            StepReport {
                name: "lint".into(),
                status: StepStatus::Success,
                exit_code: Some(0),
                duration_ms: 12,
            },
            StepReport {
                name: "test".into(),
                status: StepStatus::Timeout,
                exit_code: None,
                duration_ms: 5000,
            },
            StepReport {
                name: "pkg".into(),
                status: StepStatus::Skipped,
                exit_code: None,
                duration_ms: 0,
            },
        ],
        error: Some("x".into()),
    }
}

fn summary() -> RunSummary {
    RunSummary {
        commit: sha(3),
        state: RunState::Failure,
        branch: Some("main".into()),
        failed_steps: vec!["test".into()],
        queued_at_ms: 1,
        finished_at_ms: Some(2),
        attempts: 1,
    }
}

fn to_dispatcher() -> Vec<ToDispatcher> {
    vec![
        ToDispatcher::Submit {
            commits: vec![sha(1), sha(2)],
            branch: Some("main".into()),
            front: true,
            rerun: false,
        },
        ToDispatcher::Status,
        ToDispatcher::Runs(RunQuery {
            state: Some(RunState::Failure),
            branch: Some("main".into()),
            limit: 20,
            offset: 40,
        }),
        ToDispatcher::Run {
            prefix: "abcd".into(),
        },
        ToDispatcher::FollowLog {
            commit: sha(4),
            offset: 1 << 40,
            follow: true,
        },
        ToDispatcher::Cancel { commit: sha(5) },
        ToDispatcher::Why { commit: sha(6) },
        ToDispatcher::Register {
            addr: "127.0.0.1:8900".into(),
            held: None,
            paused: None,
        },
        ToDispatcher::Register {
            addr: "127.0.0.1:8901".into(),
            held: Some(HeldJob {
                job: JobId::new(),
                commit: sha(3),
                finished: true,
            }),
            paused: Some("origin unreachable".into()),
        },
        ToDispatcher::Pong { seq: 7 },
        ToDispatcher::Log {
            job: JobId::new(),
            offset: 99,
            data: b"[test] ok\n".to_vec(),
        },
        ToDispatcher::Done {
            job: JobId::new(),
            report: report(),
            log_len: 10,
        },
        ToDispatcher::Pause {
            reason: "draining".into(),
        },
        ToDispatcher::Resume,
        ToDispatcher::GiveBack {
            job: JobId::new(),
            reason: "checkout failed".into(),
            cause: GiveBackCause::Infrastructure,
        },
        ToDispatcher::GiveBack {
            job: JobId::new(),
            reason: "origin unreachable".into(),
            cause: GiveBackCause::OriginUnreachable,
        },
        ToDispatcher::GiveBack {
            job: JobId::new(),
            reason: "the runner was stopped".into(),
            cause: GiveBackCause::Withdrawn,
        },
        ToDispatcher::Goodbye {
            reason: "stopping".into(),
        },
    ]
}

fn from_dispatcher() -> Vec<FromDispatcher> {
    vec![
        FromDispatcher::Submitted {
            queued: 2,
            known: 1,
        },
        FromDispatcher::Registered {
            runner: RunnerId(4),
            held: Some(HeldVerdict::Adopt { log_offset: 5 }),
            heartbeat_timeout: Duration::from_millis(1500),
        },
        FromDispatcher::Registered {
            runner: RunnerId(5),
            held: Some(HeldVerdict::Drop {
                reason: "superseded".into(),
            }),
            heartbeat_timeout: Duration::from_secs(3),
        },
        FromDispatcher::Assign {
            job: JobId::new(),
            commit: sha(9),
        },
        FromDispatcher::Ping { seq: 1 },
        FromDispatcher::Cancel { job: JobId::new() },
        FromDispatcher::Status(Box::new(DispatcherStatus {
            queue: vec![QueuedView {
                commit: sha(1),
                branch: None,
                queued_at_ms: 5,
                attempts: 1,
                waiting: "no runner is registered".into(),
            }],
            running: vec![summary()],
            runners: vec![
                RunnerView {
                    id: RunnerId(1),
                    addr: "h:1".into(),
                    state: RunnerState::Busy {
                        commit: sha(2),
                        job: JobId::new(),
                    },
                },
                RunnerView {
                    id: RunnerId(2),
                    addr: "h:2".into(),
                    state: RunnerState::Paused {
                        reason: "origin unreachable".into(),
                    },
                },
            ],
            counts: vec![(RunState::Success, 3), (RunState::Cancelled, 1)],
            refusing: Some("disk full".into()),
        })),
        FromDispatcher::Runs {
            total: 9,
            runs: vec![summary()],
        },
        FromDispatcher::Run(Box::new(RunDetail {
            summary: summary(),
            steps: report().steps,
            runner: Some("h:1".into()),
            started_at_ms: Some(7),
            error: None,
            attempts: vec![AttemptView {
                job: JobId::new(),
                runner: "h:1".into(),
                started_at_ms: 7,
                ended_at_ms: None,
                outcome: "running".into(),
                reason: None,
            }],
            log_len: 12,
            result_file: "/r/x.json".into(),
        })),
        FromDispatcher::NotFound { what: "x".into() },
        FromDispatcher::Ambiguous {
            candidates: vec![sha(1), sha(2)],
        },
        FromDispatcher::LogData {
            offset: 3,
            data: b"[t] x\n".to_vec(),
        },
        FromDispatcher::LogEnd {
            offset: 9,
            state: RunState::Cancelled,
        },
        FromDispatcher::Cancelled {
            was: RunState::Queued,
        },
        FromDispatcher::Why {
            state: RunState::Queued,
            reason: "busy".into(),
        },
        FromDispatcher::ResultAck {
            job: JobId::new(),
            accepted: false,
        },
        FromDispatcher::Error {
            reason: "bad".into(),
        },
        FromDispatcher::ShuttingDown,
    ]
}

#[tokio::test]
async fn every_message_round_trips_over_a_pipe() {
    let (a, b) = duplex(1 << 16);
    let mut a = Connection::new(a);
    let mut b = Connection::new(b);
    for m in to_dispatcher() {
        a.send(&m).await.unwrap();
        assert_eq!(b.recv::<ToDispatcher>().await.unwrap(), Some(m));
    }
    for m in from_dispatcher() {
        b.send(&m).await.unwrap();
        assert_eq!(a.recv::<FromDispatcher>().await.unwrap(), Some(m));
    }
    a.send(&ToRunner::Status).await.unwrap();
    assert_eq!(b.recv::<ToRunner>().await.unwrap(), Some(ToRunner::Status));
    let st = FromRunner::Status {
        addr: "h:1".into(),
        connected: true,
        commit: Some(sha(1)),
        paused: Some("origin unreachable".into()),
    };
    b.send(&st).await.unwrap();
    assert_eq!(a.recv::<FromRunner>().await.unwrap(), Some(st));
    drop(a);
    assert_eq!(b.recv::<ToDispatcher>().await.unwrap(), None);
}

#[tokio::test]
async fn handshake_accepts_the_right_token_and_role() {
    let (a, b) = duplex(4096);
    let client = tokio::spawn(async move {
        let mut a = Connection::new(a);
        a.client_handshake(Role::Runner, "s3cret").await
    });
    let mut b = Connection::new(b);
    let role = b
        .server_handshake(&[Role::Runner, Role::Observer], Some("s3cret"))
        .await
        .unwrap();
    assert_eq!(role, Role::Runner);
    client.await.unwrap().unwrap();
}

async fn refused(hello: Hello, served: &[Role], token: Option<&str>) -> (ProtoError, ProtoError) {
    let (a, b) = duplex(4096);
    let client = tokio::spawn(async move {
        let mut a = Connection::new(a);
        a.send(&hello).await.unwrap();
        a.recv_within::<HelloReply>(Duration::from_secs(5), "reply")
            .await
    });
    let mut b = Connection::new(b);
    let server_err = b.server_handshake(served, token).await.unwrap_err();
    let reply = client.await.unwrap().unwrap();
    let HelloReply::Refused { reason } = reply else {
        panic!("not refused: {reply:?}");
    };
    (server_err, ProtoError::Refused(reason))
}

fn hello() -> Hello {
    Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
        role: Role::Observer.code(),
        token: String::new(),
    }
}

#[tokio::test]
async fn wrong_magic_is_refused_with_a_reason() {
    let (s, c) = refused(
        Hello {
            magic: 0xdead_beef,
            ..hello()
        },
        &[Role::Observer],
        None,
    )
    .await;
    assert!(matches!(s, ProtoError::BadMagic(0xdead_beef)), "{s}");
    assert!(c.to_string().contains("not a tinyci peer"), "{c}");
}

#[tokio::test]
async fn wrong_version_is_refused_with_a_reason() {
    let (s, c) = refused(
        Hello {
            version: PROTOCOL_VERSION + 1,
            ..hello()
        },
        &[Role::Observer],
        None,
    )
    .await;
    assert!(matches!(s, ProtoError::VersionMismatch { .. }), "{s}");
    assert!(c.to_string().contains("version mismatch"), "{c}");
}

#[tokio::test]
async fn unknown_and_unserved_roles_are_refused() {
    let (s, _) = refused(
        Hello {
            role: 77,
            ..hello()
        },
        &[Role::Observer],
        None,
    )
    .await;
    assert!(matches!(s, ProtoError::UnknownRole(77)), "{s}");
    let (s, _) = refused(hello(), &[Role::Client], None).await;
    assert!(matches!(s, ProtoError::WrongRole(Role::Observer)), "{s}");
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused() {
    let (s, c) = refused(hello(), &[Role::Observer], Some("abc")).await;
    assert!(matches!(s, ProtoError::BadToken), "{s}");
    assert!(c.to_string().contains("token"), "{c}");
    let (s, _) = refused(
        Hello {
            token: "abd".into(),
            ..hello()
        },
        &[Role::Observer],
        Some("abc"),
    )
    .await;
    assert!(matches!(s, ProtoError::BadToken), "{s}");
}

#[tokio::test]
async fn garbage_hello_is_a_decode_error() {
    let (mut a, b) = duplex(4096);
    a.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let mut b = Connection::new(b);
    let e = b
        .server_handshake(&[Role::Observer], None)
        .await
        .unwrap_err();
    assert!(matches!(e, ProtoError::Decode(_)), "{e}");
}

#[tokio::test]
async fn oversized_length_prefix_is_refused_before_buffering() {
    let (mut a, b) = duplex(4096);
    a.write_all(&[0xff, 0xff, 0xff, 0xf0, 1, 2, 3])
        .await
        .unwrap();
    let mut b = Connection::new(b);
    let e = b.recv::<ToDispatcher>().await.unwrap_err();
    assert!(matches!(e, ProtoError::FrameTooLarge), "{e}");
}

#[tokio::test]
async fn http_request_is_refused() {
    let (mut a, b) = duplex(4096);
    a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut b = Connection::new(b);
    let e = b
        .server_handshake(&[Role::Observer], None)
        .await
        .unwrap_err();
    assert!(matches!(e, ProtoError::FrameTooLarge), "{e}");
}

#[tokio::test]
async fn truncated_frame_is_a_typed_error() {
    let (mut a, b) = duplex(4096);
    a.write_all(&[0, 0, 0, 50, 1, 2, 3]).await.unwrap();
    drop(a);
    let mut b = Connection::new(b);
    let e = b.recv::<ToDispatcher>().await.unwrap_err();
    assert!(matches!(e, ProtoError::Truncated), "{e}");
}

#[tokio::test]
async fn silent_peer_times_out_the_handshake() {
    tokio::time::pause();
    let (_a, b) = duplex(4096);
    let mut b = Connection::new(b);
    let e = b
        .server_handshake(&[Role::Observer], None)
        .await
        .unwrap_err();
    assert!(matches!(e, ProtoError::Timeout(..)), "{e}");
}

#[test]
fn bad_commit_id_in_a_message_fails_to_decode() {
    // Encode a Submit whose commit is an arbitrary string by encoding a look-alike type.
    #[derive(serde::Serialize)]
    enum Fake {
        Submit { commits: Vec<String> },
    }
    for bad in ["../../etc/passwd", "", "ABCDEF", &"a".repeat(41)] {
        let body = encode(&Fake::Submit {
            commits: vec![bad.to_string()],
        })
        .unwrap();
        let e = decode::<ToDispatcher>(&body).unwrap_err();
        assert!(e.to_string().contains("invalid commit id"), "{e}");
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut body = encode(&ToDispatcher::Pong { seq: 1 }).unwrap();
    body.push(0);
    assert!(matches!(
        decode::<ToDispatcher>(&body),
        Err(ProtoError::Decode(_))
    ));
}

/// Runs random bytes through the frame decoder and every message decoder.
fn feed(bytes: &[u8]) {
    let mut codec = codec();
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = decode::<Hello>(&frame);
        let _ = decode::<ToDispatcher>(&frame);
        let _ = decode::<FromDispatcher>(&frame);
        let _ = decode::<ToRunner>(&frame);
        let _ = decode::<FromRunner>(&frame);
    }
    let _ = codec.decode_eof(&mut buf);
    // Bodies without framing too, so the message decoders see every byte pattern.
    let _ = decode::<ToDispatcher>(bytes);
    let _ = decode::<FromDispatcher>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("TINYCI_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(500),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        feed(&bytes);
    }

    #[test]
    fn framed_random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200), tag in 0u8..8) {
        let mut framed = Vec::with_capacity(body.len() + 5);
        framed.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
        framed.push(tag);
        framed.extend_from_slice(&body);
        feed(&framed);
    }
}

#[tokio::test]
async fn an_http_server_is_named_as_not_tinyci_with_its_first_bytes() {
    let (a, mut b) = duplex(4096);
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 256];
        let _ = b.read(&mut buf).await;
        b.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        b
    });
    let mut a = Connection::new(a);
    let e = a.client_handshake(Role::Runner, "").await.unwrap_err();
    assert!(matches!(e, ProtoError::NotTinyci(_)), "{e:?}");
    assert!(e.is_permanent());
    let text = e.to_string();
    assert!(text.contains("not a tinyci server"), "{text}");
    assert!(text.contains("HTTP/1.1 400 Bad Request"), "{text}");
    assert!(!text.contains("byte limit"), "{text}");
    drop(server.await.unwrap());
}

#[tokio::test]
async fn a_refused_hello_is_permanent_and_a_closed_connection_is_not() {
    let (a, b) = duplex(4096);
    let server = tokio::spawn(async move {
        let mut b = Connection::new(b);
        b.server_handshake(&[Role::Observer], Some("right")).await
    });
    let mut a = Connection::new(a);
    let e = a
        .client_handshake(Role::Observer, "wrong")
        .await
        .unwrap_err();
    assert!(matches!(e, ProtoError::HelloRefused(_)), "{e:?}");
    assert!(e.is_permanent());
    assert!(e.to_string().contains("token"), "{e}");
    assert!(server.await.unwrap().is_err());

    let (a, b) = duplex(4096);
    drop(b);
    let mut a = Connection::new(a);
    let e = a.client_handshake(Role::Observer, "").await.unwrap_err();
    assert!(!e.is_permanent(), "{e:?}");
}

#[tokio::test]
async fn accept_hello_says_whether_a_token_was_presented() {
    for token in ["", "unexpected"] {
        let (a, b) = duplex(4096);
        let client = tokio::spawn(async move {
            let mut a = Connection::new(a);
            a.client_handshake(Role::Runner, token).await
        });
        let mut b = Connection::new(b);
        let g = b.accept_hello(&[Role::Runner], None).await.unwrap();
        assert_eq!(g.role, Role::Runner);
        assert_eq!(g.presented_token, !token.is_empty());
        client.await.unwrap().unwrap();
    }
}
