-- Schema version 4 is reserved for another change landing in parallel (issue 8 rooms); this
-- placeholder keeps the versions gap-free until it lands. Merging: keep the real 0004, drop this.
CREATE TABLE IF NOT EXISTS schema_reserved_0004 (x INTEGER);
DROP TABLE schema_reserved_0004;
