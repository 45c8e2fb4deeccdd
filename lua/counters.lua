-- counters.lua: writes the counts that the Functions library keeps in memory for one
-- namespace (buckets.lua, "Counters kept in memory"), so that a reader sees every decision
-- made before it. Every reader of counters in the package calls it first (_counters.py).
-- As an EVALSHA script it finds nothing to write: that form writes every count at once.
--
-- KEYS: shared hash (its `_rev` names this database's counts: buckets.lua)
-- Reply: the number of decisions whose counts were written
return flush_counts(KEYS[1], redis.call('HGET', KEYS[1], '_rev'))
