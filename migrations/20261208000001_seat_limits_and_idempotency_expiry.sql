-- Idempotency records expire: from `expires_at_ms` on, a key counts as never seen, and the
-- engine's sweep deletes such records a bounded batch at a time. Records written before this
-- migration keep a day from when they were last claimed or completed.
ALTER TABLE idempotency_records ADD COLUMN expires_at_ms BIGINT UNSIGNED NOT NULL DEFAULT 0;
UPDATE idempotency_records SET expires_at_ms = COALESCE(completed_at_ms, lease_until_ms) + 86400000;
ALTER TABLE idempotency_records ALTER COLUMN expires_at_ms DROP DEFAULT;
ALTER TABLE idempotency_records ADD KEY idempotency_by_expiry (expires_at_ms);

-- A hold counts the seats its user holds or bought on the schedule (under the account's row
-- lock): this key finds them without a scan.
ALTER TABLE reservations ADD KEY reservations_by_user (user_id, schedule_id, status);
