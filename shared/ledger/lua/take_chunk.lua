-- Take one chunk for `model` by the dispatch policy (`shared.ledger.pending` and the README):
-- 1. of the first SCAN batches in turn (priority class first, then round robin), pick the first
--    whose next compat group is ready: it has `max` jobs waiting across all batches, or its oldest
--    job has waited `wait` seconds (so a lone job is held at most that long);
-- 2. pop up to `max` of that batch's jobs of that group, then fill the chunk with the same group's
--    jobs of other batches (cross-batch grouping); every batch served goes to the back of its
--    class. Ids that are no longer `queued` (cancelled) are dropped on the way.
-- ARGV: prefix, model, max, wait_s. Returns {compat, due_in_s, skipped, job_id...}: compat '' when
-- nothing was taken; due_in_s (or '') is how long until a held group becomes ready.
local model, max, wait = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local at = now()
local SCAN = 8  -- batches looked at past held groups; bounds the work of one call
local turns = K.turns(model)
local since_key = K.pending_since()
local budget = max * 64  -- bounds the ids popped (cancelled ones are skipped) in one call
local taken, skipped = {}, 0

local function ready(compat)
  if wait <= 0 then return true, nil end
  local since = tonumber(redis.call('HGET', since_key, compat))
  if not since or at - since >= wait then return true, nil end
  local n = 0
  for _, batch in ipairs(redis.call('ZRANGE', K.pending(compat), 0, max - 1)) do
    n = n + redis.call('LLEN', K.pending_jobs(compat, batch))
    if n >= max then return true, nil end
  end
  return false, since + wait
end

local chosen, compat, due = nil, nil, nil
local verdict = {}
for _, batch in ipairs(redis.call('ZRANGE', turns, 0, SCAN - 1)) do
  local first = redis.call('ZRANGE', K.batch_pending(model, batch), 0, 0)
  if #first == 0 then
    redis.call('ZREM', turns, batch)
  else
    if verdict[first[1]] == nil then
      local ok, when = ready(first[1])
      verdict[first[1]] = ok
      if not ok and (due == nil or when < due) then due = when end
    end
    if verdict[first[1]] then
      chosen, compat = batch, first[1]
      break
    end
  end
end
if not chosen then
  if redis.call('EXISTS', turns) == 0 then redis.call('SREM', K.pending_models(), model) end
  return {'', due and string.format('%.6f', due - at) or '', 0}
end

local function drain(batch)
  local key = K.pending_jobs(compat, batch)
  while #taken < max and budget > 0 do
    local id = redis.call('LPOP', key)
    if not id then break end
    budget = budget - 1
    if redis.call('HGET', K.job(id), 'state') == 'queued' then
      taken[#taken + 1] = id
      redis.call('ZADD', K.inflight(), at, id)
      redis.call('HINCRBY', K.job(id), 'dispatches', 1)
    else
      skipped = skipped + 1
    end
  end
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', K.batch_pending(model, batch), compat)
    redis.call('ZREM', K.pending(compat), batch)
  end
  -- the batch had its turn: to the back of its priority class, or out when nothing is left
  local score = tonumber(redis.call('ZSCORE', turns, batch))
  if redis.call('EXISTS', K.batch_pending(model, batch)) == 0 then
    redis.call('ZREM', turns, batch)
  elseif score then
    local class = math.floor(score / $PRIORITY_CLASS)
    redis.call('ZADD', turns, class * $PRIORITY_CLASS + redis.call('INCR', K.sequence()), batch)
  end
end

drain(chosen)
if #taken < max then
  for _, batch in ipairs(redis.call('ZRANGE', K.pending(compat), 0, max)) do
    if #taken >= max or budget <= 0 then break end
    if batch ~= chosen then drain(batch) end
  end
end
if redis.call('EXISTS', K.pending(compat)) == 0 then
  redis.call('HDEL', since_key, compat)
end
if redis.call('EXISTS', turns) == 0 then redis.call('SREM', K.pending_models(), model) end
local out = {compat, '', skipped}
for i = 1, #taken do out[#out + 1] = taken[i] end
return out
