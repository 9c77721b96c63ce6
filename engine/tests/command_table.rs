//! The NVMe command table against a model, over random sequences of
//! submissions, completions (expected, duplicated and stray), hand-outs by
//! ID and oldest-first, give-ups and cancels: a CID is never given to a
//! command while an earlier one with that CID can still be handed out or
//! is still running; a completion is handed out once, to the command it
//! belongs to, oldest first; an ID that was handed out or given up stays
//! invalid; what a command keeps alive is released exactly when its
//! completion arrives.

use std::collections::BTreeMap;
use std::sync::Arc;

use dmabuf_p2p_engine::nvme::queue::{Arrival, CommandTable, SlotState};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Take,
    /// Complete the n-th command the controller still runs.
    Complete(usize),
    /// Complete the n-th running command for a caller waiting for it, who
    /// takes it at once.
    CompleteWaited(usize),
    /// A completion for a CID (possibly not in flight).
    Stray(u16),
    /// Hand out the n-th completion not yet taken, by ID.
    TakeById(usize),
    PopReady,
    /// Give up the n-th command not yet handed out.
    Abandon(usize),
    /// Cancel the newest submission (it never reached the controller).
    CancelNewest,
    /// Ask about an ID handed out or given up earlier.
    Stale(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Take),
        3 => any::<usize>().prop_map(Op::Complete),
        1 => any::<usize>().prop_map(Op::CompleteWaited),
        1 => (0u16..80).prop_map(Op::Stray),
        2 => any::<usize>().prop_map(Op::TakeById),
        2 => Just(Op::PopReady),
        1 => any::<usize>().prop_map(Op::Abandon),
        1 => Just(Op::CancelNewest),
        1 => any::<usize>().prop_map(Op::Stale),
    ]
}

/// What the model knows of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Running,
    Abandoned,
    /// Completed, not handed out; its arrival order.
    Ready(u64),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ids_completions_and_keep_alives_follow_the_model(depth in 1u16..=64, ops in prop::collection::vec(op(), 1..400)) {
        let mut t: CommandTable<Arc<()>> = CommandTable::new(depth);
        // (cid, generation) -> state, and the keep-alive the test holds a
        // second handle of.
        let mut live: BTreeMap<(u16, u32), (St, Arc<()>)> = BTreeMap::new();
        let mut gone: Vec<(u16, u32)> = Vec::new();
        let mut arrivals = 0u64;
        let mut newest: Option<(u16, u32)> = None;
        for op in ops {
            match op {
                Op::Take => {
                    let keep = Arc::new(());
                    match t.take(2, Some(Arc::clone(&keep))) {
                        Some((cid, g)) => {
                            prop_assert!(cid < depth);
                            prop_assert!(live.keys().all(|(c, _)| *c != cid), "CID {} given out while in use", cid);
                            live.insert((cid, g), (St::Running, keep));
                            newest = Some((cid, g));
                        }
                        None => prop_assert_eq!(live.len(), usize::from(depth)),
                    }
                }
                Op::Complete(n) => {
                    let running: Vec<_> = live.iter().filter(|(_, (s, _))| matches!(s, St::Running | St::Abandoned)).map(|(k, (s, _))| (*k, *s)).collect();
                    if running.is_empty() { continue; }
                    let ((cid, g), s) = running[n % running.len()];
                    let arrival = t.complete(cid, 0, u32::from(cid));
                    // The controller is done: only the test's handle is left.
                    prop_assert_eq!(Arc::strong_count(&live[&(cid, g)].1), 1);
                    if s == St::Abandoned {
                        prop_assert_eq!(arrival, Arrival::Dropped);
                        live.remove(&(cid, g));
                        gone.push((cid, g));
                    } else {
                        prop_assert_eq!(arrival, Arrival::Kept);
                        arrivals += 1;
                        live.get_mut(&(cid, g)).unwrap().0 = St::Ready(arrivals);
                    }
                    newest = None;
                }
                Op::CompleteWaited(n) => {
                    let running: Vec<_> = live.iter().filter(|(_, (s, _))| *s == St::Running).map(|(k, _)| *k).collect();
                    if running.is_empty() { continue; }
                    let (cid, g) = running[n % running.len()];
                    prop_assert_eq!(t.complete_for(cid, 0, 7, Some(cid)), Arrival::Kept);
                    prop_assert_eq!(Arc::strong_count(&live[&(cid, g)].1), 1);
                    let got = t.take_completed(cid).unwrap();
                    prop_assert_eq!((got.cid, got.generation, got.dw0), (cid, g, 7));
                    live.remove(&(cid, g));
                    gone.push((cid, g));
                    newest = None;
                }
                Op::Stray(cid) => {
                    let running = live.iter().any(|((c, _), (s, _))| *c == cid && matches!(s, St::Running | St::Abandoned));
                    if !running {
                        prop_assert_eq!(t.complete(cid, 0, 0), Arrival::Stray);
                    }
                }
                Op::TakeById(n) => {
                    let ready: Vec<_> = live.iter().filter(|(_, (s, _))| matches!(s, St::Ready(_))).map(|(k, _)| *k).collect();
                    if ready.is_empty() { continue; }
                    let (cid, g) = ready[n % ready.len()];
                    prop_assert_eq!(t.state(cid, g), Some(SlotState::Completed));
                    let got = t.take_completed(cid).unwrap();
                    prop_assert_eq!((got.cid, got.generation, got.dw0), (cid, g, u32::from(cid)));
                    live.remove(&(cid, g));
                    gone.push((cid, g));
                }
                Op::PopReady => {
                    let oldest = live.iter().filter_map(|(k, (s, _))| match s { St::Ready(a) => Some((*a, *k)), _ => None }).min();
                    let got = t.pop_ready();
                    match oldest {
                        None => prop_assert!(got.is_none()),
                        Some((_, (cid, g))) => {
                            let got = got.unwrap();
                            prop_assert_eq!((got.cid, got.generation), (cid, g), "not the oldest completion");
                            live.remove(&(cid, g));
                            gone.push((cid, g));
                        }
                    }
                }
                Op::Abandon(n) => {
                    let open: Vec<_> = live.iter().filter(|(_, (s, _))| !matches!(s, St::Abandoned)).map(|(k, (s, _))| (*k, *s)).collect();
                    if open.is_empty() { continue; }
                    let ((cid, g), s) = open[n % open.len()];
                    prop_assert!(t.abandon(cid, g));
                    prop_assert!(!t.abandon(cid, g));
                    match s {
                        St::Ready(_) => {
                            live.remove(&(cid, g));
                            gone.push((cid, g));
                        }
                        _ => {
                            live.get_mut(&(cid, g)).unwrap().0 = St::Abandoned;
                            // Still running: still kept alive.
                            prop_assert_eq!(Arc::strong_count(&live[&(cid, g)].1), 2);
                        }
                    }
                }
                Op::CancelNewest => {
                    if let Some((cid, g)) = newest.take()
                        && live.get(&(cid, g)).is_some_and(|(s, _)| *s == St::Running)
                    {
                        t.cancel(cid);
                        prop_assert_eq!(Arc::strong_count(&live[&(cid, g)].1), 1);
                        live.remove(&(cid, g));
                        gone.push((cid, g));
                    }
                }
                Op::Stale(n) => {
                    if gone.is_empty() { continue; }
                    let (cid, g) = gone[n % gone.len()];
                    prop_assert_eq!(t.state(cid, g), None, "a stale ID is valid again");
                    prop_assert!(!t.abandon(cid, g));
                }
            }
            prop_assert_eq!(t.in_use(), live.len());
            prop_assert_eq!(t.has_ready(), live.values().any(|(s, _)| matches!(s, St::Ready(_))));
            prop_assert_eq!(t.has_running(), live.values().any(|(s, _)| matches!(s, St::Running | St::Abandoned)));
        }
        t.clear();
        prop_assert_eq!(t.in_use(), 0);
        prop_assert!(live.values().all(|(_, k)| Arc::strong_count(k) == 1), "clear released every keep-alive");
    }
}
