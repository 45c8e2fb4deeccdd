-- slots.lua: give back, or renew, the concurrency slots one admission took (acquire.lua,
-- gate.lua). Runs with buckets.lua (one Functions library, or prefixed to it as an
-- EVALSHA script).
--
-- KEYS: config hash, shared hash (the namespace's; the slot sets are named from them)
-- ARGV: slot token, "release" | "extend", hold in ms (for extend), the scheduler's waiter
--       and parked prefixes (KeySpace: tenants parked by a released cap are woken), cap
--       scopes...
-- Reply: 1 released / renewed; 0 not held (released already, or its lease ran out: then
-- nothing changes but the removal of what is left of it).
local prefix, now = ns_prefix(KEYS[1]), now_us()
local sched = {wake = ARGV[4], parked = ARGV[5]}
local scopes = table.concat(ARGV, ' ', 6)
if ARGV[2] == 'release' then
  return release_slots(prefix, ARGV[1], scopes, now, sched) and 1 or 0
end
if ARGV[2] == 'extend' then
  local hold = arg_number(ARGV[3], 60000, 1, MAX_HOLD_MS, 'slot hold (ms)')
  return extend_slots(prefix, ARGV[1], scopes, now, now + hold * 1000, sched) and 1 or 0
end
return redis.error_reply('queue-ratelimit: unknown slot operation ' .. tostring(ARGV[2]))
