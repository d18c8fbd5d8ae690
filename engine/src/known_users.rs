//! The accounts this node knows exist, so that joining a line need not read the joining
//! user's account from the record store every time.
//!
//! Accounts are never deleted, so an account seen once is an account for good. The node asks
//! the record store which accounts exist a block of [`BLOCK_IDS`] ids at a time, and keeps the
//! answer as a bitmap: a join by a user it knows needs no store call. A user it does not know
//! (an account opened since the block was read, or no account at all) makes it read that block
//! again, so a new account is found at its first join and an unknown user is refused as before.
//!
//! **Invariant:** a user is known only after the record store listed the account; nothing is
//! ever known to be missing, so a refusal always comes from a fresh read.
//! **Invariant:** at most [`BLOCKS_MAX`] blocks are kept (the lowest ids are dropped first); no
//! hash map is iterated, so a simulated run replays exactly.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use crate::domain::UserId;

/// The ids one read covers: `[k * BLOCK_IDS, (k + 1) * BLOCK_IDS)`.
pub(crate) const BLOCK_IDS: u32 = 1_024;
/// The most blocks kept (64 Mi user ids, 8 MiB of bitmaps).
pub(crate) const BLOCKS_MAX: usize = 1 << 16;

const WORDS: usize = BLOCK_IDS as usize / 64;

#[derive(Debug, Default)]
pub(crate) struct KnownUsers {
    blocks: Mutex<BTreeMap<u64, [u64; WORDS]>>,
}

impl KnownUsers {
    /// The first id of the block that holds `user_id`.
    pub(crate) fn block_start(user_id: UserId) -> UserId {
        user_id - user_id % u64::from(BLOCK_IDS)
    }

    /// Whether the record store listed `user_id` as an account.
    pub(crate) fn contains(&self, user_id: UserId) -> bool {
        let (block, word, bit) = Self::place(user_id);
        self.blocks.lock().get(&block).is_some_and(|bits| bits[word] & (1 << bit) != 0)
    }

    /// Keeps what the record store listed for the block that starts at `first`: `existing`
    /// are the ids it holds accounts for. Ids outside the block are ignored.
    pub(crate) fn learn(&self, first: UserId, existing: &[UserId]) {
        let block = first / u64::from(BLOCK_IDS);
        let mut bits = [0_u64; WORDS];
        for &user_id in existing {
            let (in_block, word, bit) = Self::place(user_id);
            if in_block == block {
                bits[word] |= 1 << bit;
            }
        }
        let mut blocks = self.blocks.lock();
        if !blocks.contains_key(&block) && blocks.len() >= BLOCKS_MAX {
            blocks.pop_first();
        }
        // A later read only adds accounts: keep what either read listed.
        let kept = blocks.entry(block).or_insert([0; WORDS]);
        for (kept, new) in kept.iter_mut().zip(bits) {
            *kept |= new;
        }
    }

    fn place(user_id: UserId) -> (u64, usize, u32) {
        let offset = user_id % u64::from(BLOCK_IDS);
        (user_id / u64::from(BLOCK_IDS), (offset / 64) as usize, (offset % 64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_known_once_its_block_listed_it_and_only_then() {
        let known = KnownUsers::default();
        assert!(!known.contains(5));
        known.learn(KnownUsers::block_start(5), &[1, 5, 1_023]);
        assert!(known.contains(1) && known.contains(5) && known.contains(1_023));
        assert!(!known.contains(2), "an id the read did not list");
        assert!(!known.contains(1_024), "the next block was not read");
        // A later read of the block adds what is new and forgets nothing.
        known.learn(0, &[2]);
        assert!(known.contains(2) && known.contains(5));
        // Ids outside the block read are not taken.
        known.learn(1_024, &[7, 1_030]);
        assert!(!known.contains(7));
        assert!(known.contains(1_030));
        assert_eq!(KnownUsers::block_start(1_030), 1_024);
    }

    #[test]
    fn the_blocks_kept_are_bounded_and_the_lowest_go_first() {
        let known = KnownUsers::default();
        let block = u64::from(BLOCK_IDS);
        for index in 0..=BLOCKS_MAX as u64 {
            known.learn(index * block, &[index * block]);
        }
        assert_eq!(known.blocks.lock().len(), BLOCKS_MAX);
        assert!(!known.contains(0), "the lowest block was dropped");
        assert!(known.contains(block) && known.contains(BLOCKS_MAX as u64 * block));
    }
}
