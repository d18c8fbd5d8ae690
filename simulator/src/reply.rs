//! What a virtual user reads from an engine's JSON answer.
//!
//! Only a handful of fields matter, so an answer is read straight into [`Reply`] instead of
//! into a `serde_json::Value` tree (which costs an allocation per key and value, for every
//! answer of a run). An answer of another shape than the engine's (a field of another type,
//! a key given twice, an array where an object belongs, no JSON at all) is read the general
//! way, as a `Value`, with the same rules: a field that is missing or of another type counts
//! as absent, and the last of two equal keys wins. Both ways give the same `Reply`.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// The fields of an answer that users and the history read; absent when missing or of another
/// type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reply {
    pub status: Option<String>,
    /// `"sold_out": true`.
    pub sold_out: bool,
    pub token: Option<String>,
    /// The `id` of each object of `seats` that has a whole number as one, in order.
    pub seat_ids: Vec<u64>,
    pub reservation_id: Option<u64>,
    pub id: Option<u64>,
    pub fence: Option<u64>,
    pub user_id: Option<u64>,
    pub points: Option<u64>,
    pub code: Option<String>,
}

impl Reply {
    /// Reads an answer's body.
    pub(crate) fn parse(body: &[u8]) -> Reply {
        match serde_json::from_slice::<ObjectOnly<Fields>>(body) {
            Ok(ObjectOnly(fields)) => fields.into(),
            Err(_) => Reply::from_value(&serde_json::from_slice(body).unwrap_or(Value::Null)),
        }
    }

    /// The general way: any JSON, read as a `Value`.
    fn from_value(value: &Value) -> Reply {
        let text = |key: &str| value[key].as_str().map(str::to_owned);
        Reply {
            status: text("status"),
            sold_out: value["sold_out"] == Value::Bool(true),
            token: text("token"),
            seat_ids: value["seats"]
                .as_array()
                .map(|seats| seats.iter().filter_map(|seat| seat["id"].as_u64()).collect())
                .unwrap_or_default(),
            reservation_id: value["reservation_id"].as_u64(),
            id: value["id"].as_u64(),
            fence: value["fence"].as_u64(),
            user_id: value["user_id"].as_u64(),
            points: value["points"].as_u64(),
            code: text("code"),
        }
    }
}

/// The engine's shape of an answer. Any other type in one of these fields fails the read, and
/// the answer is read the general way instead.
#[derive(Deserialize)]
struct Fields {
    status: Option<String>,
    sold_out: Option<bool>,
    token: Option<String>,
    seats: Option<Vec<ObjectOnly<Seat>>>,
    reservation_id: Option<u64>,
    id: Option<u64>,
    fence: Option<u64>,
    user_id: Option<u64>,
    points: Option<u64>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct Seat {
    id: Option<u64>,
}

impl From<Fields> for Reply {
    fn from(fields: Fields) -> Reply {
        Reply {
            status: fields.status,
            sold_out: fields.sold_out == Some(true),
            token: fields.token,
            seat_ids: fields.seats.unwrap_or_default().into_iter().filter_map(|ObjectOnly(seat)| seat.id).collect(),
            reservation_id: fields.reservation_id,
            id: fields.id,
            fence: fields.fence,
            user_id: fields.user_id,
            points: fields.points,
            code: fields.code,
        }
    }
}

/// A struct read only from a JSON object: a derived `Deserialize` would also take an array,
/// field by field in order, where a `Value` lookup by key finds nothing.
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer.deserialize_map(ObjectVisitor(PhantomData)).map(ObjectOnly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of reading give the same reply.
    fn both(body: &str) -> Reply {
        let general = Reply::from_value(&serde_json::from_str(body).unwrap_or(Value::Null));
        assert_eq!(Reply::parse(body.as_bytes()), general, "{body}");
        general
    }

    #[test]
    fn the_engines_answers_are_read_the_same_both_ways() {
        let joined = both(r#"{"token":"v1.1.2.3.abc","position":5,"eta_s":1,"sold_out":false}"#);
        assert_eq!(joined.token.as_deref(), Some("v1.1.2.3.abc"));
        assert!(!joined.sold_out);
        assert!(both(r#"{"status":"WAITING","position":9,"eta_s":3,"sold_out":true}"#).sold_out);
        let seats = both(r#"{"seats":[{"id":4,"section":"A","price":10,"status":"AVAILABLE"},{"id":7}]}"#);
        assert_eq!(seats.seat_ids, vec![4, 7]);
        let held = both(r#"{"id":12,"status":"HELD","fence":3,"user_id":8}"#);
        assert_eq!((held.id, held.fence, held.user_id), (Some(12), Some(3), Some(8)));
        assert_eq!(both(r#"{"code":"seat_taken","status":409}"#).code.as_deref(), Some("seat_taken"));
    }

    #[test]
    fn other_shapes_fall_back_to_the_general_reading() {
        // A field of another type is absent, the rest still count.
        let reply = both(r#"{"status":5,"id":-1,"fence":1.5,"token":"t","sold_out":"yes"}"#);
        assert_eq!((reply.status, reply.id, reply.fence, reply.sold_out), (None, None, None, false));
        assert_eq!(reply.token.as_deref(), Some("t"));
        // The last of two equal keys wins.
        assert_eq!(both(r#"{"fence":1,"fence":2}"#).fence, Some(2));
        // Arrays are not objects, at the top or among the seats.
        assert_eq!(both(r#"["HELD", 3]"#), Reply::default());
        assert_eq!(both(r#"{"seats":[[5],{"id":6},{"id":"7"},3]}"#).seat_ids, vec![6]);
        assert_eq!(both(r#"{"seats":{"id":1}}"#).seat_ids, Vec::<u64>::new());
        assert_eq!(both("not json"), Reply::default());
        assert_eq!(both(r#"{"id":1} trailing"#), Reply::default());
        assert_eq!(both(r#"{"points":18446744073709551616}"#).points, None);
    }
}
