-- shards.lua: writes one shard's copy of a sharded namespace's configuration (docs/design.md,
-- "Shards"). A shard's config hash is what its decisions enforce: every field as set at the
-- namespace's home (config.lua writes that, with the audit), except that the shared scopes
-- (global, queue:<q>) hold the shard's slice of their limit and of their concurrency cap.
--
-- KEYS: the shard's config hash, its shared hash
-- ARGV: version (of the home configuration this write comes from), lease epoch ("" for a
--       configuration write, which no epoch fences), "sync" to delete every field not named
--       here (a shard found behind: the home configuration is copied whole) or "", then
--       triples: field, value ("" deletes it), "1" when the field is a shared scope's limit
--       (its bucket is settled before the limit changes) or "".
-- Reply: the fields changed, or -1 when a newer rebalancer's lease is on the shard.
-- Runs with buckets.lua (fmt, flush_counts).
--
-- Each field is a last-writer-wins register ordered by home version: `_v:<field>` keeps the
-- version of the write that last set or deleted it, and an older write of it changes
-- nothing (two processes changing one field write the shards in any order; the newer
-- version stays). A lease write carries the version its slices were computed from, so it
-- never brings back a limit a newer configuration replaced. `_lease` keeps the newest
-- rebalancer epoch seen: a rebalancer whose lock ran out while it stalled is refused.
--
-- Settling: a decision refills a bucket at the rate it reads now, from the time the bucket
-- was last written. A slice that grows would otherwise refill the time since then at the
-- new rate (up to a whole burst out of nothing); so before a shared limit changes, its
-- bucket is brought to now at the old rate and clipped to the new burst. The slices then
-- hold the sum of the rates at every instant, which is what the bound in docs/design.md
-- rests on.
local config_key, shared_key = KEYS[1], KEYS[2]
local version, epoch, sync = tonumber(ARGV[1]), ARGV[2], ARGV[3] == 'sync'

if epoch ~= '' then
  local seen = tonumber(redis.call('HGET', config_key, '_lease') or '0')
  if tonumber(epoch) < seen then return -1 end
  redis.call('HSET', config_key, '_lease', epoch)
end

local now, now_s = nil, nil
local function clock()
  if not now then
    local t = redis.call('TIME')
    now_s = t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
    now = now_s + 0
  end
  return now
end

local function limit_parts(value)
  local rate, per, burst = string.match(value or '', '^(%S+) (%S+) (%S+) %S+$')
  rate, per, burst = tonumber(rate), tonumber(per), tonumber(burst)
  if rate and per and burst and rate > 0 and per > 0 and burst > 0 then
    return rate / (per * 1000000), burst
  end
  return nil
end

-- Brings the bucket of a shared limit to now at its old limit, clipped to the new burst.
local function settle(field, old, new)
  local old_rate, old_burst = limit_parts(old)
  local _, new_burst = limit_parts(new)
  if not (old_rate and new_burst) then return end
  local b = 'b:' .. field
  local got = redis.call('HMGET', shared_key, b, b .. ':u')
  local t = old_burst
  local at = clock()
  if got[1] and got[2] then
    local elapsed = at - got[2]
    if not (elapsed > 0) then elapsed = 0 end
    local refilled = got[1] + elapsed * old_rate
    if refilled < t then t = refilled end
  end
  if t > new_burst then t = new_burst end
  redis.call('HSET', shared_key, b, fmt(t), b .. ':u', now_s)
end

local changed, named = 0, {}
for i = 4, #ARGV, 3 do
  local field, value, shared_limit = ARGV[i], ARGV[i + 1], ARGV[i + 2] == '1'
  named[field] = true
  local stamp = '_v:' .. field
  local at = tonumber(redis.call('HGET', config_key, stamp) or '0')
  if version >= at then
    local old = redis.call('HGET', config_key, field)
    if value == '' then
      if old then
        redis.call('HDEL', config_key, field)
        changed = changed + 1
      end
    elseif old ~= value then
      if shared_limit and old then settle(field, old, value) end
      redis.call('HSET', config_key, field, value)
      changed = changed + 1
    end
    redis.call('HSET', config_key, stamp, fmt(version))
  end
end

if sync then
  -- (Fields starting with '_' are this script's own, or the revision's.)
  local fields = redis.call('HKEYS', config_key)
  for _, field in ipairs(fields) do
    local stamp = tonumber(redis.call('HGET', config_key, '_v:' .. field) or '0')
    if string.sub(field, 1, 1) ~= '_' and not named[field] and version >= stamp then
      redis.call('HDEL', config_key, field)
      redis.call('HSET', config_key, '_v:' .. field, fmt(version))
      changed = changed + 1
    end
  end
end

local current = tonumber(redis.call('HGET', config_key, '_version') or '0')
if version > current then redis.call('HSET', config_key, '_version', fmt(version)) end
if changed > 0 then
  -- Counts kept in memory are kept per revision (buckets.lua): write those of the
  -- revision this write ends, as config.lua does.
  flush_counts(shared_key, redis.call('HGET', shared_key, '_rev'))
  -- A stamp no earlier state had: decisions drop the plans they cached (buckets.lua).
  local t = redis.call('TIME')
  redis.call('HSET', shared_key, '_rev', t[1] .. '.' .. t[2] .. ':' .. fmt(version) .. ':s')
end
return changed
