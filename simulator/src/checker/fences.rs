//! Fencing tokens: the fences a seat accepts strictly grow in acceptance order.

use crate::history::AcceptedFence;

use super::context::{Context, Findings, moment};
use super::{Invariant, Moment, Subject};

fn accepted_moment(fence: &AcceptedFence) -> Moment {
    moment(
        fence.at_us,
        format!("node {} accepted fence {} for reservation {}", fence.node, fence.fence, fence.reservation_id),
    )
}

/// Walks each seat's accepted fences in acceptance order (the order they were recorded) and
/// reports, once per seat, the first write whose fence was not newer than the newest accepted
/// before it, with the count of such writes on the seat.
pub(super) fn check_fences_monotonic(context: &Context<'_>, findings: &mut Findings) {
    let fences = &context.history.fences;
    let mut order: Vec<usize> = (0..fences.len()).collect();
    // A stable sort keeps acceptance order within each seat.
    order.sort_by_key(|&position| (fences[position].schedule_id, fences[position].seat_id));
    for seat in order
        .chunk_by(|&a, &b| (fences[a].schedule_id, fences[a].seat_id) == (fences[b].schedule_id, fences[b].seat_id))
    {
        let mut newest = seat[0];
        let mut first_regression: Option<(usize, usize)> = None;
        let mut regressions = 0_u64;
        for &position in &seat[1..] {
            if fences[position].fence <= fences[newest].fence {
                regressions += 1;
                first_regression.get_or_insert((newest, position));
            } else {
                newest = position;
            }
        }
        let Some((before, after)) = first_regression else {
            continue;
        };
        findings.add(Invariant::FencesMonotonic, || {
            let (before, after) = (&fences[before], &fences[after]);
            let positions = context
                .ops_for_reservation(before.reservation_id)
                .iter()
                .chain(context.ops_for_reservation(after.reservation_id))
                .copied();
            context.violation(
                Invariant::FencesMonotonic,
                Subject::Seat { schedule_id: after.schedule_id, seat_id: after.seat_id },
                format!(
                    "fence {} (reservation {}, node {}) was accepted at {} us after fence {} \
                     (reservation {}, node {}) at {} us; {regressions} write(s) on this seat \
                     were accepted with a fence not newer than the seat's newest",
                    after.fence,
                    after.reservation_id,
                    after.node,
                    after.at_us,
                    before.fence,
                    before.reservation_id,
                    before.node,
                    before.at_us
                ),
                context.op_refs(positions),
                vec![accepted_moment(before), accepted_moment(after)],
            )
        });
    }
}
