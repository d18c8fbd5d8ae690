//! Idempotent replay: every answer to one idempotency key is the same, byte for byte.

use crate::history::Digest;

use super::context::{Context, Findings, list, moment};
use super::{Invariant, Subject};

/// How many distinct digests a message names.
const DIGESTS_NAMED_MAX: usize = 5;

/// Among the completed operations that carried one key and got an answer the engine must
/// replay (any 2xx, and the refusals the recorder marked as stored), all digests are equal.
/// Unknown outcomes and transient refusals are not answers to compare.
pub(super) fn check_idempotent_replay(context: &Context<'_>, findings: &mut Findings) {
    let operations = &context.history.operations;
    let mut answers: Vec<(&str, usize, Digest)> = operations
        .iter()
        .enumerate()
        .filter_map(|(position, operation)| {
            let key = operation.idempotency_key.as_deref()?;
            let digest = operation.outcome.replayable_digest()?;
            Some((key, position, digest))
        })
        .collect();
    answers.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    for group in answers.chunk_by(|a, b| a.0 == b.0) {
        let first_digest = group[0].2;
        if group.iter().all(|&(_, _, digest)| digest == first_digest) {
            continue;
        }
        let key = group[0].0;
        findings.add(Invariant::IdempotentReplay, || {
            let mut digests: Vec<Digest> = group.iter().map(|&(_, _, digest)| digest).collect();
            digests.sort_unstable();
            digests.dedup();
            // Quote the first answer and every answer that differs from it, so the
            // counterexample shows the disagreement even when the key was retried often.
            let quoted: Vec<usize> = std::iter::once(group[0].1)
                .chain(group.iter().filter(|&&(_, _, digest)| digest != first_digest).map(|&(_, position, _)| position))
                .collect();
            let times = quoted
                .iter()
                .map(|&position| {
                    let operation = &operations[position];
                    moment(
                        operation.complete_us.unwrap_or(operation.invoke_us),
                        format!(
                            "op #{} answered with digest {}",
                            operation.op_id,
                            operation.outcome.replayable_digest().unwrap_or_default()
                        ),
                    )
                })
                .collect();
            context.violation(
                Invariant::IdempotentReplay,
                Subject::IdempotencyKey { key: key.to_owned() },
                format!(
                    "{} answers to the same key carry {} different responses (digests {})",
                    group.len(),
                    digests.len(),
                    list(&digests, DIGESTS_NAMED_MAX)
                ),
                context.op_refs(quoted),
                times,
            )
        });
    }
}
