//! In-process tests of the dispatcher's connection handling ([`serve`] and the runner
//! loop) over `tokio::io::duplex` pipes, with time paused: heartbeats, timeouts and the
//! bounded event queue without a socket or a real sleep.
//!
//! The test is both peers of the handler: a fake runner that speaks the real protocol on
//! one end of the pipe, and a fake core that reads the handler's [`Event`]s from the queue
//! (answering `RunnerJoined` as the core would), or does not read them, to play a core
//! that is busy. What the core does with the events (requeue a lost runner's job, count
//! attempts) is tested with the core's own state machine in [`super::state`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use tinyci_proto::{
    CommitId, Connection, FromDispatcher, JobId, ProtoError, Role, RunnerId, ToDispatcher,
};
use tokio::io::DuplexStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::core::Event;
use super::{event_queue, serve, Config, Ctx, EVENT_QUEUE};
use crate::shutdown::Shutdown;

const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes the pipe between the peers holds in each direction.
const PIPE: usize = 64 * 1024;
/// The id the fake core gives the runner.
const RUNNER: RunnerId = RunnerId(7);
/// How long (in paused time) a test waits for something before it fails.
const PATIENCE: Duration = Duration::from_secs(120);

/// What the handlers get from `run`: the real event queue, and the settings above.
fn context() -> (Arc<Ctx>, Receiver<Event>) {
    let (events, rx) = event_queue();
    let ctx = Arc::new(Ctx {
        events,
        config: Config {
            results_dir: "unused-by-connections".into(),
            heartbeat_interval: HEARTBEAT_INTERVAL,
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
            max_attempts: 3,
            token: None,
        },
        shutdown: Shutdown::new(),
        log_changed: tokio::sync::watch::channel(0u64).1,
        counters: None,
        warned_unchecked_token: AtomicBool::new(false),
    });
    (ctx, rx)
}

/// The next event the handler gave the core, polled in paused time (each empty poll lets
/// the clock move on by a millisecond, so timing is exact to that).
async fn next_event(rx: &Receiver<Event>) -> Event {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match rx.try_recv() {
            Ok(ev) => return ev,
            Err(TryRecvError::Disconnected) => panic!("every handler is gone"),
            Err(TryRecvError::Empty) => {
                assert!(Instant::now() < deadline, "no event within {PATIENCE:?}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// A runner registered through the handler, and what the test holds for it.
struct Registered {
    conn: Connection<DuplexStream>,
    handler: JoinHandle<()>,
    /// The core's side of the runner's outbox; dropping it would end the connection.
    _outbox: UnboundedSender<FromDispatcher>,
}

/// Starts the handler on one end of a pipe and registers a runner on the other, the fake
/// core answering the `RunnerJoined`.
async fn register(ctx: &Arc<Ctx>, rx: &Receiver<Event>) -> Registered {
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let handler_ctx = ctx.clone();
    let peer: SocketAddr = ([127, 0, 0, 1], 40000).into();
    let handler = tokio::spawn(async move { serve(theirs, peer, &handler_ctx).await });
    let mut conn = Connection::new(ours);
    conn.client_handshake(Role::Runner, "")
        .await
        .expect("hello welcomed");
    conn.send(&ToDispatcher::Register {
        addr: "runner-1:8900".into(),
        held: None,
        paused: None,
    })
    .await
    .expect("Register sent");
    let outbox = match next_event(rx).await {
        Event::RunnerJoined {
            addr, tx, reply, ..
        } => {
            assert_eq!(addr, "runner-1:8900");
            reply
                .send((RUNNER, None))
                .expect("handler waits for its id");
            tx
        }
        _ => panic!("expected RunnerJoined first"),
    };
    match conn
        .recv_within::<FromDispatcher>(PATIENCE, "Registered")
        .await
    {
        Ok(FromDispatcher::Registered {
            runner,
            heartbeat_timeout,
            ..
        }) => {
            assert_eq!(runner, RUNNER);
            assert_eq!(heartbeat_timeout, HEARTBEAT_TIMEOUT);
        }
        other => panic!("expected Registered, got {other:?}"),
    }
    Registered {
        conn,
        handler,
        _outbox: outbox,
    }
}

/// Plays a runner that answers every ping for `period`; returns how many it answered, and
/// when it sent its last pong.
async fn answer_pings_for(conn: &mut Connection<DuplexStream>, period: Duration) -> (u64, Instant) {
    let until = Instant::now() + period;
    let mut answered = 0;
    let mut last = Instant::now();
    while Instant::now() < until {
        match conn
            .recv_within::<FromDispatcher>(until - Instant::now(), "a ping")
            .await
        {
            Ok(FromDispatcher::Ping { seq }) => {
                conn.send(&ToDispatcher::Pong { seq }).await.expect("pong");
                answered += 1;
                last = Instant::now();
            }
            Ok(other) => panic!("expected Ping, got {other:?}"),
            Err(ProtoError::Timeout(..)) => break,
            Err(e) => panic!("connection failed while answering pings: {e}"),
        }
    }
    (answered, last)
}

/// Reads what the dispatcher still sends until it closes; panics on anything but pings.
async fn expect_closed(conn: &mut Connection<DuplexStream>) {
    loop {
        match conn
            .recv_within::<FromDispatcher>(PATIENCE, "the close")
            .await
        {
            Ok(FromDispatcher::Ping { .. }) => {}
            Err(ProtoError::Closed) => return,
            other => panic!("expected the dispatcher to close, got {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_answers_pings_stays() {
    let (ctx, rx) = context();
    let mut runner = register(&ctx, &rx).await;
    let period = HEARTBEAT_TIMEOUT * 10;
    let (answered, _) = answer_pings_for(&mut runner.conn, period).await;
    // One ping at once, then one per interval.
    assert!(
        answered >= period.as_secs() / HEARTBEAT_INTERVAL.as_secs(),
        "only {answered} pings in {period:?}"
    );
    assert!(
        matches!(rx.try_recv(), Err(TryRecvError::Empty)),
        "the core heard of a runner that answers every ping"
    );
    assert!(!runner.handler.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_stops_answering_pings_is_lost_after_the_heartbeat_timeout() {
    let (ctx, rx) = context();
    let mut runner = register(&ctx, &rx).await;
    let (_, silent_since) = answer_pings_for(&mut runner.conn, HEARTBEAT_TIMEOUT * 3).await;
    // From here the runner reads nothing and answers nothing (a hung process, or a
    // partition that swallows its frames).
    match next_event(&rx).await {
        Event::RunnerLost {
            runner: id,
            reason,
            goodbye,
        } => {
            let after = silent_since.elapsed();
            assert_eq!(id, RUNNER);
            assert_eq!(reason, format!("no heartbeat for {HEARTBEAT_TIMEOUT:?}"));
            assert!(
                !goodbye,
                "a silent runner did not say goodbye: its loss counts"
            );
            assert!(
                after >= HEARTBEAT_TIMEOUT && after < HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL,
                "lost {after:?} after its last pong; the timeout is {HEARTBEAT_TIMEOUT:?}"
            );
        }
        _ => panic!("expected RunnerLost"),
    }
    expect_closed(&mut runner.conn).await;
    runner.handler.await.expect("handler ended cleanly");
}

#[tokio::test(start_paused = true)]
async fn a_runner_that_says_goodbye_is_lost_uncounted() {
    let (ctx, rx) = context();
    let mut runner = register(&ctx, &rx).await;
    runner
        .conn
        .send(&ToDispatcher::Goodbye {
            reason: "the runner is stopping".into(),
        })
        .await
        .expect("goodbye sent");
    match next_event(&rx).await {
        Event::RunnerLost {
            runner: id,
            reason,
            goodbye,
        } => {
            assert_eq!(id, RUNNER);
            assert_eq!(reason, "the runner is stopping");
            assert!(goodbye);
        }
        _ => panic!("expected RunnerLost"),
    }
    expect_closed(&mut runner.conn).await;
}

#[tokio::test(start_paused = true)]
async fn a_stopping_dispatcher_tells_its_runners_and_reports_no_loss() {
    let (ctx, rx) = context();
    let mut runner = register(&ctx, &rx).await;
    ctx.shutdown.cancel();
    loop {
        match runner
            .conn
            .recv_within::<FromDispatcher>(PATIENCE, "ShuttingDown")
            .await
        {
            Ok(FromDispatcher::Ping { .. }) => {}
            Ok(FromDispatcher::ShuttingDown) => break,
            other => panic!("expected ShuttingDown, got {other:?}"),
        }
    }
    expect_closed(&mut runner.conn).await;
    runner.handler.await.expect("handler ended cleanly");
    // Not lost: the restarted dispatcher adopts the runner's job, uncounted.
    assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
}

/// Item 9 of issue 9, "bounded everywhere": the event queue between the connections and the
/// core holds [`EVENT_QUEUE`] events; a connection whose event does not fit waits, and so
/// stops reading its peer. A peer that floods a busy core is held back by the transport —
/// the dispatcher buffers what the queue and one pipe's worth hold, not what the peer
/// sends — and nothing is lost once the core catches up.
#[tokio::test(start_paused = true)]
async fn a_flood_waits_for_a_busy_core_and_loses_nothing() {
    const FLOOD: usize = 4 * EVENT_QUEUE;
    const CHUNK: usize = 1024;
    let (ctx, rx) = context();
    let Registered {
        mut conn,
        handler,
        _outbox,
    } = register(&ctx, &rx).await;
    let job = JobId::new();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let flood = tokio::spawn(async move {
        for i in 0..FLOOD {
            conn.send(&ToDispatcher::Log {
                job,
                offset: (i * CHUNK) as u64,
                data: vec![b'x'; CHUNK],
            })
            .await
            .expect("the dispatcher takes the flood, in time");
            counter.fetch_add(1, Ordering::SeqCst);
        }
        conn
    });

    // The core is busy: nobody reads the queue. Time moves on only while every task waits,
    // so after this the flood and the handler are stuck (well within the send timeout).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_at = sent.load(Ordering::SeqCst);
    // Frames in flight: one waiting to enter the queue, the pipe's contents and the
    // codec's read buffer (8 KiB, grown to one frame).
    let in_flight = 1 + PIPE / CHUNK + 16;
    assert!(
        stalled_at <= EVENT_QUEUE + in_flight,
        "the dispatcher took {stalled_at} frames from a peer while its core read none \
         (queue {EVENT_QUEUE}): the flood is not held back"
    );
    assert!(!flood.is_finished(), "the whole flood went through");

    // Exactly a full queue waits for the core, in order.
    let mut received = 0;
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Log { runner, offset, .. } => {
                assert_eq!(runner, RUNNER);
                assert_eq!(offset, (received * CHUNK) as u64);
                received += 1;
            }
            _ => panic!("expected only Log events"),
        }
    }
    assert_eq!(
        received, EVENT_QUEUE,
        "the queue's capacity was not the bound"
    );

    // The core catches up: the rest arrives, none lost, none reordered.
    while received < FLOOD {
        match next_event(&rx).await {
            Event::Log { offset, .. } => {
                assert_eq!(offset, (received * CHUNK) as u64);
                received += 1;
            }
            _ => panic!("expected only Log events"),
        }
    }
    let conn = flood.await.expect("the flood ended");
    assert_eq!(sent.load(Ordering::SeqCst), FLOOD);
    drop(conn);
    match next_event(&rx).await {
        Event::RunnerLost { reason, .. } => assert_eq!(reason, "connection closed"),
        _ => panic!("expected RunnerLost"),
    }
    handler.await.expect("handler ended cleanly");
}

/// A Submit waits for the core's answer like every event: an observer is acknowledged only
/// once the core says its commits are durable.
#[tokio::test(start_paused = true)]
async fn an_observer_is_acknowledged_only_by_the_core() {
    let (ctx, rx) = context();
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let handler_ctx = ctx.clone();
    let handler =
        tokio::spawn(
            async move { serve(theirs, ([127, 0, 0, 1], 40001).into(), &handler_ctx).await },
        );
    let mut conn = Connection::new(ours);
    conn.client_handshake(Role::Observer, "")
        .await
        .expect("hello welcomed");
    let commit = CommitId::parse(&"ab".repeat(20)).expect("valid id");
    conn.send(&ToDispatcher::Submit {
        commits: vec![commit.clone()],
        branch: Some("main".into()),
        front: false,
        rerun: false,
    })
    .await
    .expect("Submit sent");
    let reply = match next_event(&rx).await {
        Event::Submit {
            commits,
            branch,
            reply,
            ..
        } => {
            assert_eq!(commits, vec![commit]);
            assert_eq!(branch.as_deref(), Some("main"));
            reply
        }
        _ => panic!("expected Submit"),
    };
    // However long the core takes, no answer goes out before its own.
    assert!(matches!(
        conn.recv_within::<FromDispatcher>(Duration::from_secs(60), "an early answer")
            .await,
        Err(ProtoError::Timeout(..))
    ));
    reply
        .send(FromDispatcher::Error {
            reason: "the core's own answer".into(),
        })
        .expect("handler waits");
    match conn
        .recv_within::<FromDispatcher>(PATIENCE, "the answer")
        .await
    {
        Ok(FromDispatcher::Error { reason }) => assert_eq!(reason, "the core's own answer"),
        other => panic!("expected the core's answer, got {other:?}"),
    }
    drop(conn);
    handler.await.expect("handler ended cleanly");
}
