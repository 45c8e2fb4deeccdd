-- slots.lua: give back, or renew, the concurrency slots one admission took (acquire.lua,
-- gate.lua). Runs with buckets.lua (one Functions library, or prefixed to it as an
-- EVALSHA script).
--
-- KEYS: config hash, shared hash (the namespace's; the slot sets are named from them)
-- ARGV: slot token, "release" | "extend", hold in ms (for extend; release sends 0), the
--       scheduler's waiter and parked prefixes (KeySpace: tenants parked by a released cap
--       are woken), cap scopes...
-- Reply: 1 released / renewed; 0 not held (released already, or its lease ran out: then
-- nothing changes but the removal of what is left of it).
local prefix, now = ns_prefix(KEYS[1]), now_us()
local sched = {wake = ARGV[4], parked = ARGV[5]}
local scopes = {unpack(ARGV, 6)}  -- (a list: no text joined only to be split again)
local op = ARGV[2]
if op ~= 'release' and op ~= 'extend' then
  return redis.error_reply('queue-ratelimit: unknown slot operation ' .. tostring(op))
end
local hold = op == 'extend' and arg_number(ARGV[3], 60000, 1, MAX_HOLD_MS, 'slot hold (ms)') or nil
-- A holder whose hold ran out in a silence still holds its slots until the grace ends
-- (buckets.lua, "Silences"): it may renew or release them.
-- (A release of slots still live, the usual one, would not need the horizon: their
-- deadlines are after now, hence after any horizon. It still notes the call: it shows
-- that Redis was reached. Where slots are only taken and given back (no renewals: short
-- jobs under a cap), releases are the only calls that note; without them the next full
-- cap with a dead holder would find a silence, and keep that holder's slot a lease longer.
-- The note costs its HGET, rarely more: lease_horizon's memo.)
local horizon, untl = lease_horizon(KEYS[2], now / 1000, nil, hold)
local live_after = untl and horizon * 1000 or now
if op == 'release' then
  return release_slots(prefix, ARGV[1], scopes, live_after, sched) and 1 or 0
end
return extend_slots(prefix, ARGV[1], scopes, live_after, now + hold * 1000, sched) and 1 or 0
