//! Queue bookkeeping without memory: submission tail and the head the
//! controller last reported, completion head and phase, and command slots.

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

    /// The slot the next completion will be in.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Whether an entry whose phase tag is `phase` at the head is new.
    pub fn is_new(&self, phase: bool) -> bool {
        phase == self.phase
    }

    /// Consumes the head entry; returns the new head for the doorbell.
    pub fn advance(&mut self) -> u16 {
        self.head += 1;
        if self.head == self.entries {
            self.head = 0;
            self.phase = !self.phase;
        }
        self.head
    }
}

/// Command identifiers in use, one per slot; a slot's index is its CID.
#[derive(Debug, Clone)]
pub struct Slots {
    busy: Vec<bool>,
}

impl Slots {
    /// `n` free slots.
    pub fn new(n: u16) -> Self {
        Self {
            busy: vec![false; usize::from(n)],
        }
    }

    /// Takes a free slot.
    pub fn take(&mut self) -> Option<u16> {
        let i = self.busy.iter().position(|b| !b)?;
        self.busy[i] = true;
        u16::try_from(i).ok()
    }

    /// Frees `cid`; false if it was not taken (a completion nobody waits for).
    pub fn free(&mut self, cid: u16) -> bool {
        match self.busy.get_mut(usize::from(cid)) {
            Some(b) if *b => {
                *b = false;
                true
            }
            _ => false,
        }
    }

    /// Slots taken.
    pub fn in_use(&self) -> usize {
        self.busy.iter().filter(|b| **b).count()
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
    }

    #[test]
    fn slots() {
        let mut s = Slots::new(2);
        assert_eq!(s.take(), Some(0));
        assert_eq!(s.take(), Some(1));
        assert_eq!(s.take(), None);
        assert!(s.free(0));
        assert!(!s.free(0));
        assert!(!s.free(5));
        assert_eq!(s.in_use(), 1);
        assert_eq!(s.take(), Some(0));
    }
}
