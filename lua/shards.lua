-- shards.lua: writes one shard's copy of a sharded namespace's configuration (docs/design.md,
-- "Shards"). A shard's config hash is what its decisions enforce: every field as set at the
-- namespace's home (config.lua writes that, with the audit), except that the shared scopes
-- (global, queue:<q>) hold the shard's slice of their limit and of their concurrency cap.
--
-- KEYS: the shard's config hash, its shared hash
-- ARGV: version (of the home configuration this write comes from), lease epoch ("" for a
--       configuration write, which no epoch fences), "sync" to delete every field not named
--       here (a shard found behind: the home configuration is copied whole), "fence" (no
--       triples: a round starting, see below) or "", then triples: field, value ("" deletes
--       it), "1" when the field is a shared scope's limit (its bucket is settled before the
--       limit changes) or "".
-- Reply: the fields changed (for "fence": the decisions whose counts it wrote), or -1 when
-- a newer rebalancer's lease is on the shard.
-- "state" instead writes the rebalancer's state at the namespace's home: KEYS[1] is the
-- home lease hash, the triples are pairs (field, value), version is unused; refused (-1)
-- unless the hash's `epoch` is still the round's, so a round that a newer one started after
-- never overwrites the newer round's state (shares, counters seen) with its own.
-- Runs with buckets.lua (fmt, flush_counts).
--
-- Each field is a last-writer-wins register ordered by home version: `_v:<field>` keeps the
-- version of the write that last set or deleted it, and an older write of it changes
-- nothing (two processes changing one field write the shards in any order; the newer
-- version stays). A lease write carries the version its slices were computed from, so it
-- never brings back a limit a newer configuration replaced. `_lease` keeps the newest
-- rebalancer epoch seen: a rebalancer whose lock ran out while it stalled is refused. A round
-- fences every shard with its epoch before it reads ("fence", which also writes the counts
-- the library keeps in memory, as counters.lua does, for the round to read): from then on
-- an older round is refused on every shard, not only on those the newer one writes.
--
-- Settling: a decision refills a bucket at the rate it reads now, from the time the bucket
-- was last written. A slice that grows would otherwise refill the time since then at the
-- new rate (up to a whole burst out of nothing); so before a shared limit changes, its
-- bucket is brought to now at the old rate and clipped to the new burst. The slices then
-- hold the sum of the rates at every instant, which is what the bound in docs/design.md
-- rests on.
local config_key, shared_key = KEYS[1], KEYS[2]
local version, epoch, sync = tonumber(ARGV[1]), ARGV[2], ARGV[3] == 'sync'

if ARGV[3] == 'state' then
  if tonumber(redis.call('HGET', config_key, 'epoch') or '0') ~= tonumber(epoch) then
    return -1
  end
  if #ARGV > 3 then redis.call('HSET', config_key, unpack(ARGV, 4)) end
  return (#ARGV - 3) / 2
end

if epoch ~= '' then
  local seen = tonumber(redis.call('HGET', config_key, '_lease') or '0')
  if tonumber(epoch) < seen then return -1 end
  redis.call('HSET', config_key, '_lease', epoch)
end
if ARGV[3] == 'fence' then return flush_counts(shared_key, redis.call('HGET', shared_key, '_rev')) end

local now, now_s = nil, nil
local function clock()
  if not now then
    local t = redis.call('TIME')
    now_s = t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
    now = now_s + 0
  end
  return now
end

-- The windows of a limit (lua/buckets.lua, add_buckets): per window its rate (tokens per
-- us), burst, credit and the suffix of its fields after the scope's bucket field: "" for
-- the (first) shortest window, ":w<seconds>" (":<n>" for more of one period) for others.
-- Nil for a value that is no limit.
local function windows(value)
  local out, shortest = {}, false
  for w in string.gmatch(value or '', '[^;]+') do
    local rate, per, burst, flags = string.match(w, '^(%S+) (%S+) (%S+) (%S+)$')
    rate, per, burst = tonumber(rate), tonumber(per), tonumber(burst)
    if not (rate and per and burst and rate > 0 and per > 0 and burst > 0) then return nil end
    local credit = tonumber(string.match(flags, 'c(.+)$') or '0') or 0
    out[#out + 1] = {rate = rate / (per * 1000000), burst = burst, credit = credit, per = per}
    if not shortest or per < shortest then shortest = per end
  end
  if #out == 0 then return nil end
  local seen = {}
  for _, w in ipairs(out) do
    local n = (seen[w.per] or 0) + 1
    seen[w.per] = n
    w.suffix = ''
    if #out > 1 and (w.per ~= shortest or n > 1) then
      w.suffix = ':w' .. fmt(w.per)
      if n > 1 then w.suffix = w.suffix .. ':' .. n end
    end
  end
  return out
end

-- Brings the buckets of a shared limit to now at its old limit, clipped to the new one:
-- each window the old and the new limit share; a credit bucket as one bucket of burst +
-- credit (buckets.lua, with_credit), split back into its own tokens and its bank.
local function settle(field, old, new)
  local olds, news = windows(old), windows(new)
  if not (olds and news) then return end
  local by_suffix = {}
  for _, w in ipairs(olds) do by_suffix[w.suffix] = w end
  for _, nw in ipairs(news) do
    local ow = by_suffix[nw.suffix]
    if ow then
      local b = 'b:' .. field .. nw.suffix
      local got = redis.call('HMGET', shared_key, b, b .. ':u', b .. ':c')
      local t = ow.burst + ow.credit
      local at = clock()
      if got[1] and got[2] then
        local elapsed = at - got[2]
        if not (elapsed > 0) then elapsed = 0 end
        local refilled = got[1] + (got[3] or 0) + elapsed * ow.rate
        if refilled < t then t = refilled end
      end
      if t > nw.burst + nw.credit then t = nw.burst + nw.credit end
      local own = t
      if own > nw.burst then own = nw.burst end
      redis.call('HSET', shared_key, b, fmt(own), b .. ':u', now_s)
      if nw.credit > 0 or got[3] then redis.call('HSET', shared_key, b .. ':c', fmt(t - own)) end
    end
  end
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
