//! Queue bookkeeping without memory: the admin submission ring's tail and
//! head, a completion ring's head and phase, and the command table that
//! gives out command identifiers.
//!
//! A command identifier (CID) names a slot of the table. It is busy from
//! submission until the caller has been handed the command's completion,
//! or until the completion of a command the caller gave up has arrived, and
//! only then given out again: a completion the controller posts can always
//! be told from every later command's. Each use of a slot has a generation,
//! so that the caller's handle of a finished command is recognised as
//! stale instead of naming the slot's next command.

/// A submission queue's indices.
#[derive(Debug, Clone)]
pub struct SubmissionRing {
    entries: u16,
    tail: u16,
    head: u16,
}

impl SubmissionRing {
    /// A queue of `entries` (at least 2) slots, empty.
    pub fn new(entries: u16) -> Self {
        Self {
            entries: entries.max(2),
            tail: 0,
            head: 0,
        }
    }

    /// Whether one more entry fits (one slot always stays empty).
    pub fn is_full(&self) -> bool {
        (self.tail + 1) % self.entries == self.head
    }

    /// The slot for the next entry and the tail value to write to the
    /// doorbell after it; `None` when full.
    pub fn push(&mut self) -> Option<(u16, u16)> {
        if self.is_full() {
            return None;
        }
        let slot = self.tail;
        self.tail = (self.tail + 1) % self.entries;
        Some((slot, self.tail))
    }

    /// Records the head a completion reported (SQHD).
    pub fn set_head(&mut self, head: u16) {
        if head < self.entries {
            self.head = head;
        }
    }

    /// Entries submitted and not yet consumed by the controller.
    pub fn in_flight(&self) -> u16 {
        (self.tail + self.entries - self.head) % self.entries
    }
}

/// A completion queue's head and expected phase.
#[derive(Debug, Clone)]
pub struct CompletionRing {
    entries: u16,
    head: u16,
    phase: bool,
}

impl CompletionRing {
    /// A queue of `entries` slots; the controller's first pass writes phase 1.
    pub fn new(entries: u16) -> Self {
        Self {
            entries: entries.max(2),
            head: 0,
            phase: true,
        }
    }

    /// A ring at `head` expecting `phase` (after raw use of the queue).
    pub fn at(entries: u16, head: u16, phase: bool) -> Self {
        Self {
            entries: entries.max(2),
            head: head % entries.max(2),
            phase,
        }
    }

    /// The slot the next completion will be in.
    #[inline]
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The phase tag a new entry at the head carries.
    #[inline]
    pub fn phase(&self) -> bool {
        self.phase
    }

    /// Whether an entry whose phase tag is `phase` at the head is new.
    #[inline]
    pub fn is_new(&self, phase: bool) -> bool {
        phase == self.phase
    }

    /// Consumes the head entry; returns the new head for the doorbell.
    #[inline]
    pub fn advance(&mut self) -> u16 {
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        self.head
    }
}

/// Where a slot of the [`CommandTable`] is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Free: its CID may be given to the next command.
    Free,
    /// Submitted; its completion has not arrived.
    InFlight,
    /// Submitted and given up by the caller; its completion will be
    /// dropped when it arrives, which frees the slot.
    Abandoned,
    /// Its completion arrived and waits to be handed to the caller.
    Completed,
}

/// What [`CommandTable::complete`] did with a completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The command's completion is kept for its caller.
    Kept,
    /// The command had been given up: its slot is free again.
    Dropped,
    /// No command with that CID was in flight (a controller bug, or a CID
    /// past the table): ignored.
    Stray,
}

/// The completion of a command, as handed to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The slot (CID).
    pub cid: u16,
    /// The generation of the slot's use this was.
    pub generation: u32,
    /// The command's opcode.
    pub opcode: u8,
    /// The 15-bit status field.
    pub status: u16,
    /// Dword 0 of the completion (command specific).
    pub dw0: u32,
}

/// No slot: the end of a list.
const NONE: u16 = u16::MAX;

#[derive(Debug, Clone)]
struct Slot<K> {
    generation: u32,
    state: SlotState,
    opcode: u8,
    status: u16,
    dw0: u32,
    /// The ready list (completions not yet handed out), oldest first; a
    /// completion about to be handed to its waiter is not linked.
    linked: bool,
    prev: u16,
    next: u16,
    /// What the command keeps alive until the controller is done with it
    /// (the memory its data goes to or comes from).
    keep: Option<K>,
}

/// The command slots of one queue: which CIDs are busy, the completions
/// not yet handed to the caller (oldest first), and what each command
/// keeps alive. Every operation is O(1) and allocates nothing.
#[derive(Debug, Clone)]
pub struct CommandTable<K> {
    slots: Vec<Slot<K>>,
    /// Free CIDs, a ring: the longest-free is given out next.
    free: Vec<u16>,
    free_head: usize,
    free_len: usize,
    ready_head: u16,
    ready_tail: u16,
}

impl<K> CommandTable<K> {
    /// A table of `depth` slots (CIDs `0..depth`), all free; `depth` is
    /// at least 1 and below `u16::MAX`.
    pub fn new(depth: u16) -> Self {
        let depth = depth.clamp(1, u16::MAX - 1);
        Self {
            slots: (0..depth)
                .map(|_| Slot {
                    generation: 0,
                    state: SlotState::Free,
                    opcode: 0,
                    status: 0,
                    dw0: 0,
                    linked: false,
                    prev: NONE,
                    next: NONE,
                    keep: None,
                })
                .collect(),
            free: (0..depth).collect(),
            free_head: 0,
            free_len: usize::from(depth),
            ready_head: NONE,
            ready_tail: NONE,
        }
    }

    /// Number of slots.
    pub fn depth(&self) -> u16 {
        // At most u16::MAX - 1 slots (`new`).
        self.slots.len() as u16
    }

    /// Slots not free: in flight, given up but not completed, or completed
    /// and not yet handed out.
    #[inline]
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free_len
    }

    /// Takes a free slot for a command with `opcode` that keeps `keep`
    /// alive; its CID and generation. `None` when every slot is busy.
    #[inline]
    pub fn take(&mut self, opcode: u8, keep: Option<K>) -> Option<(u16, u32)> {
        if self.free_len == 0 {
            return None;
        }
        let cid = self.free[self.free_head];
        self.free_head += 1;
        if self.free_head == self.free.len() {
            self.free_head = 0;
        }
        self.free_len -= 1;
        let slot = &mut self.slots[usize::from(cid)];
        slot.generation = slot.generation.wrapping_add(1);
        slot.state = SlotState::InFlight;
        slot.opcode = opcode;
        // A free slot keeps nothing (every release empties it): nothing to
        // drop, and nothing to store for a command without a keep-alive.
        debug_assert!(slot.keep.is_none());
        if keep.is_some() {
            slot.keep = keep;
        }
        Some((cid, slot.generation))
    }

    /// Returns a slot taken for a command that never reached the
    /// controller.
    pub fn cancel(&mut self, cid: u16) {
        if let Some(slot) = self.slots.get_mut(usize::from(cid))
            && slot.state == SlotState::InFlight
        {
            slot.keep = None;
            self.release(cid);
        }
    }

    /// The state of the command `cid` of generation `generation`; `None`
    /// when the slot is past the table, free, or in a later use (the
    /// command's completion was handed out or dropped).
    #[inline]
    pub fn state(&self, cid: u16, generation: u32) -> Option<SlotState> {
        let slot = self.slots.get(usize::from(cid))?;
        (slot.generation == generation && slot.state != SlotState::Free).then_some(slot.state)
    }

    /// Whether slot `cid` holds a completion not yet handed out.
    #[inline]
    pub fn is_completed(&self, cid: u16) -> bool {
        self.slots
            .get(usize::from(cid))
            .is_some_and(|s| s.state == SlotState::Completed)
    }

    /// Whether a completion waits to be handed out.
    #[inline]
    pub fn has_ready(&self) -> bool {
        self.ready_head != NONE
    }

    /// Whether a command is in flight for a caller (submitted, not given
    /// up, its completion not arrived).
    pub fn has_waited_for(&self) -> bool {
        self.slots.iter().any(|s| s.state == SlotState::InFlight)
    }

    /// Whether the controller still has a command of this table: in
    /// flight or given up, its completion not arrived.
    pub fn has_running(&self) -> bool {
        self.slots
            .iter()
            .any(|s| matches!(s.state, SlotState::InFlight | SlotState::Abandoned))
    }

    /// The CIDs of the commands the controller still has (see
    /// [`has_running`](Self::has_running)).
    pub fn running(&self) -> impl Iterator<Item = u16> + '_ {
        (0u16..)
            .zip(&self.slots)
            .filter(|(_, s)| matches!(s.state, SlotState::InFlight | SlotState::Abandoned))
            .map(|(cid, _)| cid)
    }

    /// Records the completion of CID `cid` with status field `status` and
    /// dword 0 `dw0`. The command's `keep` is released: the controller is
    /// done with its memory.
    #[inline]
    pub fn complete(&mut self, cid: u16, status: u16, dw0: u32) -> Arrival {
        self.complete_for(cid, status, dw0, None)
    }

    /// [`complete`](Self::complete), when a caller waits for CID `waited`:
    /// its completion is kept out of the ready list, since it is taken at
    /// once ([`take_completed`](Self::take_completed)).
    #[inline]
    pub fn complete_for(
        &mut self,
        cid: u16,
        status: u16,
        dw0: u32,
        waited: Option<u16>,
    ) -> Arrival {
        let Some(slot) = self.slots.get_mut(usize::from(cid)) else {
            return Arrival::Stray;
        };
        match slot.state {
            SlotState::InFlight => {
                slot.state = SlotState::Completed;
                slot.status = status;
                slot.dw0 = dw0;
                if let Some(k) = slot.keep.take() {
                    drop(k);
                }
                if waited == Some(cid) {
                    slot.linked = false;
                    return Arrival::Kept;
                }
                slot.linked = true;
                slot.next = NONE;
                slot.prev = self.ready_tail;
                if self.ready_tail == NONE {
                    self.ready_head = cid;
                } else {
                    self.slots[usize::from(self.ready_tail)].next = cid;
                }
                self.ready_tail = cid;
                Arrival::Kept
            }
            SlotState::Abandoned => {
                slot.keep = None;
                self.release(cid);
                Arrival::Dropped
            }
            SlotState::Free | SlotState::Completed => Arrival::Stray,
        }
    }

    /// Hands out the completion in slot `cid` (which
    /// [`is_completed`](Self::is_completed)) and frees the slot.
    #[inline]
    pub fn take_completed(&mut self, cid: u16) -> Option<Taken> {
        let slot = self.slots.get(usize::from(cid))?;
        if slot.state != SlotState::Completed {
            return None;
        }
        let taken = Taken {
            cid,
            generation: slot.generation,
            opcode: slot.opcode,
            status: slot.status,
            dw0: slot.dw0,
        };
        if slot.linked {
            let (prev, next) = (slot.prev, slot.next);
            if prev == NONE {
                self.ready_head = next;
            } else {
                self.slots[usize::from(prev)].next = next;
            }
            if next == NONE {
                self.ready_tail = prev;
            } else {
                self.slots[usize::from(next)].prev = prev;
            }
        }
        self.release(cid);
        Some(taken)
    }

    /// Hands out the oldest completion not yet handed out.
    #[inline]
    pub fn pop_ready(&mut self) -> Option<Taken> {
        if self.ready_head == NONE {
            return None;
        }
        self.take_completed(self.ready_head)
    }

    /// Gives up the command `cid` of generation `generation`: a command in
    /// flight keeps its slot (and what it keeps alive) until its completion
    /// arrives and is dropped; a completed one is dropped now. `false` if
    /// that command is not in the table (see [`state`](Self::state)) or was
    /// given up already.
    pub fn abandon(&mut self, cid: u16, generation: u32) -> bool {
        match self.state(cid, generation) {
            Some(SlotState::InFlight) => {
                self.slots[usize::from(cid)].state = SlotState::Abandoned;
                true
            }
            Some(SlotState::Completed) => {
                self.take_completed(cid);
                true
            }
            _ => false,
        }
    }

    /// Gives up every command: what the table keeps alive is released.
    /// Only once the controller can no longer touch the commands' memory
    /// (their queue deleted).
    pub fn clear(&mut self) {
        for cid in 0..self.depth() {
            let slot = &mut self.slots[usize::from(cid)];
            if slot.state != SlotState::Free {
                slot.keep = None;
                slot.state = SlotState::Free;
            }
        }
        for (i, f) in (0..).zip(self.free.iter_mut()) {
            *f = i;
        }
        self.free_head = 0;
        self.free_len = self.free.len();
        self.ready_head = NONE;
        self.ready_tail = NONE;
    }

    /// Lends slots `0..n` of an empty table to a caller that drives them
    /// itself (prepared commands): they count as in flight, so no command
    /// gets their CIDs, until [`give_back`](Self::give_back). `false` (and
    /// nothing lent) if a slot is in use or `n` is not `1..=depth`.
    pub fn lend(&mut self, n: u16) -> bool {
        let depth = self.depth();
        if self.in_use() != 0 || n == 0 || n > depth {
            return false;
        }
        for slot in &mut self.slots[..usize::from(n)] {
            slot.generation = slot.generation.wrapping_add(1);
            slot.state = SlotState::InFlight;
            slot.opcode = 0;
        }
        for (i, f) in (n..depth).zip(self.free.iter_mut()) {
            *f = i;
        }
        self.free_head = 0;
        self.free_len = usize::from(depth - n);
        true
    }

    /// Takes back lent slot `cid`: free again, or, if its command still
    /// runs, given up (its completion dropped when it comes) and keeping
    /// `keep` alive until then. Other slots are left alone.
    pub fn give_back(&mut self, cid: u16, running: bool, keep: Option<K>) {
        let Some(slot) = self.slots.get_mut(usize::from(cid)) else {
            return;
        };
        if slot.state != SlotState::InFlight {
            return;
        }
        if running {
            slot.state = SlotState::Abandoned;
            slot.keep = keep;
        } else {
            self.release(cid);
        }
    }

    /// Puts `cid` at the end of the free ring.
    #[inline]
    fn release(&mut self, cid: u16) {
        self.slots[usize::from(cid)].state = SlotState::Free;
        let mut at = self.free_head + self.free_len;
        if at >= self.free.len() {
            at -= self.free.len();
        }
        self.free[at] = cid;
        self.free_len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submission_ring_keeps_one_slot_free() {
        let mut sq = SubmissionRing::new(4);
        assert_eq!(sq.push(), Some((0, 1)));
        assert_eq!(sq.push(), Some((1, 2)));
        assert_eq!(sq.push(), Some((2, 3)));
        assert!(sq.is_full());
        assert_eq!(sq.push(), None);
        assert_eq!(sq.in_flight(), 3);
        sq.set_head(2);
        assert_eq!(sq.push(), Some((3, 0)));
        assert_eq!(sq.push(), Some((0, 1)));
        assert!(sq.is_full());
        sq.set_head(99); // out of range: ignored
        assert!(sq.is_full());
    }

    #[test]
    fn completion_phase_flips_on_wrap() {
        let mut cq = CompletionRing::new(2);
        assert!(cq.is_new(true) && !cq.is_new(false));
        assert_eq!(cq.advance(), 1);
        assert_eq!(cq.advance(), 0);
        assert!(cq.is_new(false) && !cq.is_new(true));
        assert_eq!(cq.head(), 0);
        let at = CompletionRing::at(4, 6, false);
        assert_eq!((at.head(), at.phase()), (2, false));
    }

    /// Issue 26: A and B complete, B is handed out, C is submitted: C must
    /// not get A's CID while A's completion is not handed out, and A's
    /// completion stays A's.
    #[test]
    fn a_cid_is_not_reused_before_its_completion_is_handed_out() {
        let mut t = CommandTable::<()>::new(4);
        let a = t.take(2, None).unwrap();
        let b = t.take(2, None).unwrap();
        assert_eq!(t.complete(a.0, 0, 10), Arrival::Kept);
        assert_eq!(t.complete(b.0, 0, 11), Arrival::Kept);
        assert_eq!(t.take_completed(b.0).unwrap().dw0, 11);
        let c = t.take(2, None).unwrap();
        assert_ne!(c.0, a.0);
        assert_eq!(t.state(c.0, c.1), Some(SlotState::InFlight));
        assert!(!t.is_completed(c.0));
        let got = t.take_completed(a.0).unwrap();
        assert_eq!((got.cid, got.generation, got.dw0), (a.0, a.1, 10));
        // A's handle is stale now, also once its slot is reused (the
        // longest-free CID goes first: A's comes after the two never used).
        assert_eq!(t.state(a.0, a.1), None);
        let d = t.take(2, None).unwrap();
        let e = t.take(2, None).unwrap();
        assert_eq!(e.0, b.0);
        assert_ne!(d.0, a.0);
        t.complete(d.0, 0, 0);
        t.take_completed(d.0).unwrap();
        let reused = t.take(2, None).unwrap();
        assert_eq!(reused.0, a.0);
        assert_ne!(reused.1, a.1);
        assert_eq!(t.state(a.0, a.1), None);
        assert!(!t.abandon(a.0, a.1));
        assert!(t.take_completed(a.0).is_none());
    }

    #[test]
    fn the_ready_list_is_oldest_first_and_survives_out_of_order_takes() {
        let mut t = CommandTable::<()>::new(8);
        let ids: Vec<_> = (0..5).map(|_| t.take(1, None).unwrap()).collect();
        for &(cid, _) in ids.iter().rev() {
            assert_eq!(t.complete(cid, 0, u32::from(cid)), Arrival::Kept);
        }
        // Take the middle one and the newest out of order.
        assert_eq!(t.take_completed(ids[2].0).unwrap().cid, ids[2].0);
        assert_eq!(t.take_completed(ids[0].0).unwrap().cid, ids[0].0);
        let order: Vec<u16> = std::iter::from_fn(|| t.pop_ready().map(|x| x.cid)).collect();
        assert_eq!(order, vec![ids[4].0, ids[3].0, ids[1].0]);
        assert_eq!(t.in_use(), 0);
        assert!(!t.has_ready());
    }

    #[test]
    fn abandoned_commands_keep_their_memory_until_they_complete() {
        let kept = std::sync::Arc::new(());
        let mut t = CommandTable::new(2);
        let a = t.take(2, Some(std::sync::Arc::clone(&kept))).unwrap();
        assert!(t.abandon(a.0, a.1));
        assert!(!t.abandon(a.0, a.1), "given up twice");
        assert_eq!(t.state(a.0, a.1), Some(SlotState::Abandoned));
        assert_eq!(std::sync::Arc::strong_count(&kept), 2);
        assert_eq!(t.in_use(), 1);
        assert_eq!(t.complete(a.0, 0, 0), Arrival::Dropped);
        assert_eq!(std::sync::Arc::strong_count(&kept), 1);
        assert_eq!(t.in_use(), 0);
        assert!(!t.has_ready());
        // A second completion for it, or one for a CID never given out.
        assert_eq!(t.complete(a.0, 0, 0), Arrival::Stray);
        assert_eq!(t.complete(7, 0, 0), Arrival::Stray);
    }

    #[test]
    fn lent_slots_are_given_to_no_command_until_given_back() {
        let kept = std::sync::Arc::new(());
        let mut t = CommandTable::new(4);
        let a = t.take(1, None).unwrap();
        assert!(!t.lend(2), "a slot is in use");
        t.complete(a.0, 0, 0);
        t.take_completed(a.0).unwrap();
        assert!(!t.lend(0) && !t.lend(5));
        assert!(t.lend(3));
        assert_eq!(t.in_use(), 3);
        assert_eq!(t.take(1, None).map(|x| x.0), Some(3));
        assert_eq!(t.take(1, None), None);
        // Slot 1's command still runs: given up, its keep held until its
        // completion; slots 0 and 2 are free at once.
        t.give_back(0, false, None);
        t.give_back(1, true, Some(std::sync::Arc::clone(&kept)));
        t.give_back(2, false, Some(std::sync::Arc::clone(&kept)));
        assert_eq!(std::sync::Arc::strong_count(&kept), 2);
        assert_eq!(t.running().collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(t.complete(1, 0, 0), Arrival::Dropped);
        assert_eq!(std::sync::Arc::strong_count(&kept), 1);
        assert_eq!(t.in_use(), 1);
        let next: Vec<u16> = (0..3).map(|_| t.take(1, None).unwrap().0).collect();
        assert_eq!(next, vec![0, 2, 1]);
    }

    #[test]
    fn a_full_table_gives_nothing_and_cancel_returns_the_slot() {
        let mut t = CommandTable::<()>::new(2);
        let a = t.take(1, None).unwrap();
        let _b = t.take(1, None).unwrap();
        assert_eq!(t.take(1, None), None);
        t.cancel(a.0);
        assert_eq!(t.in_use(), 1);
        assert_eq!(t.take(1, None).map(|x| x.0), Some(a.0));
        t.clear();
        assert_eq!(t.in_use(), 0);
        assert_eq!(t.depth(), 2);
    }
}
