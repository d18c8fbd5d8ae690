//! Long polls on a waiting line, woken only when admission reaches them.
//!
//! Waking every waiter whenever the head of the line moves costs one poll per waiter per
//! admission tick: with a hundred thousand people in line, that is the whole server's time.
//! Here each waiter registers its place in the order of admission and is woken once the head
//! passes it, in place order (so a simulated run replays exactly).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;

/// The head of one line and the long polls waiting on it.
#[derive(Debug, Default)]
pub(crate) struct LineSignal {
    head_order_index: AtomicU64,
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    next_ticket: u64,
    by_place: BTreeMap<(u64, u64), oneshot::Sender<()>>,
}

/// One registered long poll; dropping it unregisters.
#[derive(Debug)]
pub(crate) struct Registration<'a> {
    signal: &'a LineSignal,
    key: (u64, u64),
    woken: oneshot::Receiver<()>,
}

impl Registration<'_> {
    /// Resolves when the head passes this waiter's place, or the line wakes everyone.
    pub(crate) async fn woken(&mut self) {
        let _ = (&mut self.woken).await;
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.signal.waiters.lock().by_place.remove(&self.key);
    }
}

impl LineSignal {
    /// The order index of the next one to be admitted.
    pub(crate) fn head(&self) -> u64 {
        self.head_order_index.load(Ordering::Acquire)
    }

    /// Waits for the head to pass `order_index` (at once if it already has).
    pub(crate) fn register(&self, order_index: u64) -> Registration<'_> {
        let (sender, woken) = oneshot::channel();
        let mut waiters = self.waiters.lock();
        let key = (order_index, waiters.next_ticket);
        waiters.next_ticket += 1;
        if self.head() > order_index {
            let _ = sender.send(());
        } else {
            waiters.by_place.insert(key, sender);
        }
        Registration { signal: self, key, woken }
    }

    /// Moves the head to `head_order_index` and wakes everyone it passed, in place order.
    pub(crate) fn advance(&self, head_order_index: u64) {
        let mut waiters = self.waiters.lock();
        let before = self.head_order_index.fetch_max(head_order_index, Ordering::AcqRel);
        if head_order_index <= before {
            return;
        }
        let still_waiting = waiters.by_place.split_off(&(head_order_index, 0));
        let reached = std::mem::replace(&mut waiters.by_place, still_waiting);
        drop(waiters);
        for sender in reached.into_values() {
            let _ = sender.send(());
        }
    }

    /// Wakes every waiter (for example when the schedule sells out).
    pub(crate) fn wake_all(&self) {
        let everyone = std::mem::take(&mut self.waiters.lock().by_place);
        for sender in everyone.into_values() {
            let _ = sender.send(());
        }
    }

    /// How many long polls are registered.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiters.lock().by_place.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_waiters_the_head_passed_are_woken() {
        let signal = LineSignal::default();
        let mut first = signal.register(3);
        let mut second = signal.register(10);
        signal.advance(5);
        tokio::time::timeout(std::time::Duration::from_millis(10), first.woken()).await.expect("passed by the head");
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(10), second.woken()).await.is_err(),
            "not reached yet"
        );
        drop(first);
        assert_eq!(signal.waiting(), 1);
        signal.wake_all();
        tokio::time::timeout(std::time::Duration::from_millis(10), second.woken()).await.expect("woken by wake_all");
    }

    #[tokio::test]
    async fn a_waiter_already_passed_is_woken_at_once_and_dropping_unregisters() {
        let signal = LineSignal::default();
        signal.advance(7);
        let mut passed = signal.register(2);
        tokio::time::timeout(std::time::Duration::from_millis(10), passed.woken()).await.expect("already passed");
        let waiting = signal.register(9);
        assert_eq!(signal.waiting(), 1);
        drop(waiting);
        assert_eq!(signal.waiting(), 0);
    }
}
