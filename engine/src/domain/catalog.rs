//! What is on sale: concerts, their schedules, sections with prices, and seats.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ScheduleId, SeatId};

/// A concert: the thing people queue for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concert {
    pub id: u64,
    pub name: String,
}

/// A priced block of seats in a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub name: String,
    pub price_points: u64,
    pub seats_count: u32,
}

/// One performance of a concert: the sale for it opens at `opens_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub id: ScheduleId,
    pub concert: Concert,
    pub opens_at_ms: u64,
    pub sections: Vec<Section>,
}

impl Schedule {
    /// The total number of seats over all sections.
    pub fn seats_total(&self) -> u64 {
        self.sections.iter().map(|section| u64::from(section.seats_count)).sum()
    }

    /// Lays out the schedule's seats, numbering them from `first_seat_id` section by section.
    pub fn layout_seats(&self, first_seat_id: SeatId) -> Vec<Seat> {
        let mut seats = Vec::with_capacity(usize::try_from(self.seats_total()).unwrap_or(0));
        let mut next_id = first_seat_id;
        for (section_index, section) in self.sections.iter().enumerate() {
            for _ in 0..section.seats_count {
                seats.push(Seat {
                    id: next_id,
                    schedule_id: self.id,
                    section_index,
                    price_points: section.price_points,
                });
                next_id += 1;
            }
        }
        seats
    }
}

/// A seat of one schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seat {
    pub id: SeatId,
    pub schedule_id: ScheduleId,
    pub section_index: usize,
    pub price_points: u64,
}

/// A seat's sale status as the public sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SeatStatus {
    Available,
    Held,
    Sold,
}

/// One row of a seat map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SeatView {
    pub id: SeatId,
    pub section: String,
    pub price: u64,
    pub status: SeatStatus,
}

/// One row of the list of schedules on sale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ScheduleSummary {
    pub id: ScheduleId,
    pub concert: String,
    pub opens_at: u64,
    pub seats_total: u64,
    pub seats_available: u64,
    pub seats_sold: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seats_are_laid_out_section_by_section_with_their_price() {
        let schedule = Schedule {
            id: 7,
            concert: Concert { id: 1, name: "Opening".into() },
            opens_at_ms: 0,
            sections: vec![
                Section { name: "A".into(), price_points: 300, seats_count: 2 },
                Section { name: "B".into(), price_points: 100, seats_count: 1 },
            ],
        };
        let seats = schedule.layout_seats(10);
        assert_eq!(schedule.seats_total(), 3);
        let summary: Vec<(SeatId, usize, u64)> =
            seats.iter().map(|seat| (seat.id, seat.section_index, seat.price_points)).collect();
        assert_eq!(summary, vec![(10, 0, 300), (11, 0, 300), (12, 1, 100)]);
    }
}
