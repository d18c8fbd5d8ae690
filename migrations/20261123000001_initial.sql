-- T-CORE's system of record on MariaDB. Times are milliseconds since the Unix epoch, as the
-- engine's clock gives them; amounts are whole points.

CREATE TABLE id_counters (
    name VARCHAR(32) NOT NULL PRIMARY KEY,
    next_id BIGINT UNSIGNED NOT NULL
) ENGINE = InnoDB;

INSERT INTO id_counters (name, next_id) VALUES ('seat', 1);

CREATE TABLE schedules (
    id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    concert_id BIGINT UNSIGNED NOT NULL,
    concert_name VARCHAR(200) NOT NULL,
    opens_at_ms BIGINT UNSIGNED NOT NULL
) ENGINE = InnoDB;

CREATE TABLE sections (
    schedule_id BIGINT UNSIGNED NOT NULL,
    section_index INT UNSIGNED NOT NULL,
    name VARCHAR(100) NOT NULL,
    price_points BIGINT UNSIGNED NOT NULL,
    seats_count INT UNSIGNED NOT NULL,
    PRIMARY KEY (schedule_id, section_index),
    CONSTRAINT sections_schedule FOREIGN KEY (schedule_id) REFERENCES schedules (id)
) ENGINE = InnoDB;

-- One row per seat: who holds it (reservation and fence), whether it is sold, and the newest
-- fence it saw, written or read with.
CREATE TABLE seats (
    id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    schedule_id BIGINT UNSIGNED NOT NULL,
    section_index INT UNSIGNED NOT NULL,
    price_points BIGINT UNSIGNED NOT NULL,
    holder_reservation_id BIGINT UNSIGNED NULL,
    holder_fence BIGINT UNSIGNED NULL,
    sold BOOLEAN NOT NULL DEFAULT FALSE,
    hold_expires_at_ms BIGINT UNSIGNED NOT NULL DEFAULT 0,
    fence_last BIGINT UNSIGNED NOT NULL DEFAULT 0,
    KEY seats_by_section (schedule_id, section_index, id),
    CONSTRAINT seats_schedule FOREIGN KEY (schedule_id) REFERENCES schedules (id)
) ENGINE = InnoDB;

CREATE TABLE accounts (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(100) NOT NULL,
    balance BIGINT UNSIGNED NOT NULL
) ENGINE = InnoDB;

-- Top-up idempotency keys: a key adds points once, for one user.
CREATE TABLE top_ups (
    idempotency_key VARCHAR(255) NOT NULL PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL
) ENGINE = InnoDB;

-- MariaDB has no partial index: `active_seat_id` is the seat while the reservation is HELD or
-- CONFIRMED and NULL otherwise, and is unique per schedule, so two active reservations of one
-- seat cannot both be written, whatever the code above does.
CREATE TABLE reservations (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    schedule_id BIGINT UNSIGNED NOT NULL,
    seat_id BIGINT UNSIGNED NOT NULL,
    user_id BIGINT UNSIGNED NOT NULL,
    status VARCHAR(10) NOT NULL,
    fence BIGINT UNSIGNED NOT NULL,
    price_points BIGINT UNSIGNED NOT NULL,
    paid_points BIGINT UNSIGNED NOT NULL DEFAULT 0,
    held_at_ms BIGINT UNSIGNED NOT NULL,
    expires_at_ms BIGINT UNSIGNED NOT NULL,
    confirmed_at_ms BIGINT UNSIGNED NULL,
    ended_at_ms BIGINT UNSIGNED NULL,
    active_seat_id BIGINT UNSIGNED AS (IF(status IN ('HELD', 'CONFIRMED'), seat_id, NULL)) PERSISTENT,
    UNIQUE KEY reservations_active_seat (schedule_id, active_seat_id),
    KEY reservations_held_by_expiry (status, expires_at_ms),
    KEY reservations_by_seat (seat_id),
    CONSTRAINT reservations_status CHECK (status IN ('HELD', 'CONFIRMED', 'EXPIRED', 'CANCELLED'))
) ENGINE = InnoDB;

-- Every fence a seat accepted, in order (the checker reads it).
CREATE TABLE accepted_fences (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    schedule_id BIGINT UNSIGNED NOT NULL,
    seat_id BIGINT UNSIGNED NOT NULL,
    fence BIGINT UNSIGNED NOT NULL,
    reservation_id BIGINT UNSIGNED NOT NULL,
    node VARCHAR(100) NOT NULL,
    at_ms BIGINT UNSIGNED NOT NULL
) ENGINE = InnoDB;

-- The point ledger: the balance is the sum of an account's deltas. A reservation is charged
-- at most once (`charged_reservation_id` is unique).
CREATE TABLE ledger (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_id BIGINT UNSIGNED NOT NULL,
    delta BIGINT NOT NULL,
    reason VARCHAR(10) NOT NULL,
    reservation_id BIGINT UNSIGNED NULL,
    idempotency_key VARCHAR(255) NULL,
    at_ms BIGINT UNSIGNED NOT NULL,
    charged_reservation_id BIGINT UNSIGNED AS (IF(reason = 'charge', reservation_id, NULL)) PERSISTENT,
    UNIQUE KEY ledger_one_charge_per_reservation (charged_reservation_id),
    KEY ledger_by_user (user_id),
    CONSTRAINT ledger_reason CHECK (reason IN ('top_up', 'charge', 'refund'))
) ENGINE = InnoDB;

-- Idempotency keys of HTTP requests: a lease while the request runs, then its response.
CREATE TABLE idempotency_records (
    idempotency_key VARCHAR(255) NOT NULL PRIMARY KEY,
    fingerprint BINARY(32) NOT NULL,
    state VARCHAR(12) NOT NULL,
    lease_until_ms BIGINT UNSIGNED NOT NULL DEFAULT 0,
    response_status SMALLINT UNSIGNED NULL,
    response_content_type VARCHAR(255) NULL,
    response_body MEDIUMBLOB NULL,
    completed_at_ms BIGINT UNSIGNED NULL,
    CONSTRAINT idempotency_state CHECK (state IN ('in_progress', 'completed'))
) ENGINE = InnoDB;

-- Written in the same transaction as the change it records; the relay publishes and marks it.
CREATE TABLE outbox (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    kind VARCHAR(32) NOT NULL,
    reservation_id BIGINT UNSIGNED NULL,
    user_id BIGINT UNSIGNED NOT NULL,
    at_ms BIGINT UNSIGNED NOT NULL,
    sent BOOLEAN NOT NULL DEFAULT FALSE,
    KEY outbox_unsent (sent, id),
    KEY outbox_by_reservation (reservation_id)
) ENGINE = InnoDB;

CREATE TABLE audit_log (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at_ms BIGINT UNSIGNED NOT NULL,
    node VARCHAR(100) NOT NULL,
    actor VARCHAR(100) NOT NULL,
    action VARCHAR(100) NOT NULL,
    target VARCHAR(255) NOT NULL,
    before_json LONGTEXT NOT NULL,
    after_json LONGTEXT NOT NULL,
    outcome TEXT NOT NULL
) ENGINE = InnoDB;
