-- config.lua: change one configuration field atomically, bump the version and append an
-- audit entry, so every worker sees the change on its next decision and operators can see
-- who changed what.
--
-- Bucket state is never touched here: deleting a limit and setting it again must not hand
-- out a fresh burst (the bucket simply refills with time, as it would have anyway), and a
-- tenant's bucket may also serve the tenant:* default.
--
-- Every change also sets `_rev` in the shared hash to a stamp no earlier state had (Redis
-- TIME of the change and the version): decisions cache what the configuration says per
-- revision and read `_rev` along with their shared buckets (buckets.lua); `_version` alone
-- could repeat after the hash is deleted and recreated. Writing the config hash in any
-- other way than through this script leaves those caches stale.
--
-- KEYS: config hash, audit stream, shared hash
-- ARGV: op ("set" | "del"), field, value (for set), actor, audit length
-- Reply: {version, old value or false}; for "del" of an absent field: {-1, false}
local config_key, audit_key, shared_key = KEYS[1], KEYS[2], KEYS[3]
local op, field, value, actor, audit_len = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

local old = redis.call('HGET', config_key, field)
if op == 'del' then
  if not old then return {-1, false} end
  redis.call('HDEL', config_key, field)
  value = ''
elseif old == value then
  return {tonumber(redis.call('HGET', config_key, '_version') or 0), old}
end
-- Counts kept in memory are kept per revision (buckets.lua): write those of the revision
-- this change ends, while it is still the one this database holds.
flush_counts(shared_key, redis.call('HGET', shared_key, '_rev'))
local version = redis.call('HINCRBY', config_key, '_version', 1)
local t = redis.call('TIME')
if op ~= 'del' then redis.call('HSET', config_key, field, value) end
redis.call('HSET', shared_key, '_rev', t[1] .. '.' .. t[2] .. ':' .. version)
redis.call('XADD', audit_key, 'MAXLEN', '~', audit_len, '*',
  'version', version, 'op', op, 'field', field, 'old', old or '', 'new', value,
  'actor', actor, 'at_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
return {version, old}
