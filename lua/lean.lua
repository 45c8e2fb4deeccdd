-- lean.lua: which path decides the admissions of a (tenant, queue, priority) in this
-- library, for tests and diagnostics (buckets.lua, "The lean path"): "lean", "general",
-- or "none" when no plan is cached yet for the configuration now in force (always, as an
-- EVALSHA script: that form keeps no plan between calls). Reads the revision only.
--
-- KEYS: tenant hash, shared hash (as acquire.lua's)
-- ARGV: queue ("" for none), priority ("" for none)
return lean_status(config_key_of(KEYS[2]), KEYS[1], KEYS[2], ARGV[1] or '', ARGV[2] or '')
