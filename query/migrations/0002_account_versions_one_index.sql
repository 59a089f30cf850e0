-- account_versions is the projection's largest table (a row per account per event) and every
-- index on it is maintained on every event. One index serves the version history: newest first
-- from a version (paging), and back from the newest to a seq or a time (read-your-write and
-- "as of" reads, which look at recent versions). The separate seq and time indexes cost more
-- per event than the projector's own work for those rows.
ALTER TABLE account_versions
    DROP CONSTRAINT account_versions_pkey,
    ADD PRIMARY KEY (account_id, version, shard_id);
DROP INDEX account_versions_by_seq;
DROP INDEX account_versions_by_time;
