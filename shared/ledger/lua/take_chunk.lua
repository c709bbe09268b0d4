-- Take one chunk for `model` by the dispatch policy (`shared.ledger.pending` and the README):
-- 1. tenants take turns by weight: each has a pass, which grows by jobs taken / its weight, and
--    the tenant with the lowest pass goes next among those whose most urgent ready batch is in
--    the most urgent priority class any tenant has ready (priority first, then the share);
-- 2. within that tenant, of the first SCAN of its batches in turn (priority class first, then
--    round robin), the first whose next compat group is ready: it has `max` jobs waiting across
--    all batches, or its oldest job has waited `wait` seconds (a lone job is held at most that);
-- 3. pop up to `max` of that batch's jobs of that group, then fill the chunk with the same
--    group's jobs of the tenant's other batches, then of other tenants' (cross-batch grouping;
--    each tenant's pass grows by its own jobs). Every batch served goes to the back of its class
--    in its tenant's turns. Ids that are no longer `queued` (cancelled) are dropped on the way.
-- ARGV: prefix, model, max, wait_s, then tenant, weight pairs (a tenant not named weighs 1).
-- Returns {compat, due_in_s, skipped, job_id...}: compat '' when nothing was taken; due_in_s
-- (or '') is how long until a held group becomes ready. Uses join_tenant (join_tenant.lua).
local model, max, wait = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local weights = {}
for i = 5, #ARGV - 1, 2 do weights[ARGV[i]] = tonumber(ARGV[i + 1]) end
local function weight(tenant) return weights[tenant] or 1 end
local at = now()
local SCAN = 8  -- batches of one tenant looked at past held groups; bounds the work of one call
local MIGRATE = 100  -- batches moved per call from a farm's turns from before tenants
local tenants = K.tenant_turns(model)
local legacy = K.turns(model)
local since_key = K.pending_since()
local budget = max * 64  -- bounds the ids popped (cancelled ones are skipped) in one call
local taken, skipped = {}, 0
local charged = {}  -- tenant -> jobs of its in this chunk

local function tenant_of(batch)
  return redis.call('HGET', K.batch(batch), 'tenant') or '$DEFAULT_TENANT'
end

local function leave(tenant, pass)
  redis.call('ZREM', tenants, tenant)
  redis.call('HSET', K.tenant_pass(model), tenant, pass)
end

local function idle()
  if redis.call('EXISTS', tenants) == 0 and redis.call('EXISTS', legacy) == 0 then
    redis.call('SREM', K.pending_models(), model)
  end
end

-- A farm from before tenants kept one turn order per model: move it over, a slice a call.
local old = redis.call('ZRANGE', legacy, 0, MIGRATE - 1, 'WITHSCORES')
for i = 1, #old, 2 do
  local batch, tenant = old[i], tenant_of(old[i])
  redis.call('ZADD', K.batch_turns(model, tenant), 'NX', old[i + 1], batch)
  local groups = redis.call('ZRANGE', K.batch_pending(model, batch), 0, -1, 'WITHSCORES')
  for j = 1, #groups, 2 do
    redis.call('ZADD', K.tenant_pending(tenant, groups[j]), 'NX', groups[j + 1], batch)
  end
  join_tenant(model, tenant)
  redis.call('ZREM', legacy, batch)
end

-- A tenant kept behind (by more urgent work, or by held groups) banks one chunk at most.
local clock = tonumber(redis.call('GET', K.fair_clock(model))) or 0
local order = redis.call('ZRANGE', tenants, 0, -1, 'WITHSCORES')
local lifted = false
for i = 1, #order, 2 do
  local floor = clock - max / weight(order[i])
  if tonumber(order[i + 1]) < floor then
    redis.call('ZADD', tenants, floor, order[i])
    lifted = true
  end
end
if lifted then order = redis.call('ZRANGE', tenants, 0, -1, 'WITHSCORES') end

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

local chosen, owner, compat, class, due = nil, nil, nil, nil, nil
local verdict = {}
for i = 1, #order, 2 do
  local tenant = order[i]
  local turns = K.batch_turns(model, tenant)
  local rows = redis.call('ZRANGE', turns, 0, SCAN - 1, 'WITHSCORES')
  for j = 1, #rows, 2 do
    local batch = rows[j]
    local batch_class = math.floor(tonumber(rows[j + 1]) / $PRIORITY_CLASS)
    -- a later tenant (a higher pass) wins only with more urgent work
    if chosen and batch_class >= class then break end
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
        chosen, owner, compat, class = batch, tenant, first[1], batch_class
        break
      end
    end
  end
  if redis.call('EXISTS', turns) == 0 then leave(tenant, order[i + 1]) end
end
if not chosen then
  idle()
  return {'', due and string.format('%.6f', due - at) or '', 0}
end

local function drain(batch, tenant)
  local key = K.pending_jobs(compat, batch)
  local got = 0
  while #taken < max and budget > 0 do
    local id = redis.call('LPOP', key)
    if not id then break end
    budget = budget - 1
    if redis.call('HGET', K.job(id), 'state') == 'queued' then
      taken[#taken + 1] = id
      got = got + 1
      redis.call('ZADD', K.inflight(), at, id)
      redis.call('HINCRBY', K.job(id), 'dispatches', 1)
    else
      skipped = skipped + 1
    end
  end
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', K.batch_pending(model, batch), compat)
    redis.call('ZREM', K.pending(compat), batch)
    redis.call('ZREM', K.tenant_pending(tenant, compat), batch)
  end
  -- the batch had its turn: to the back of its priority class, or out when nothing is left
  local turns = K.batch_turns(model, tenant)
  local score = tonumber(redis.call('ZSCORE', turns, batch))
  if redis.call('EXISTS', K.batch_pending(model, batch)) == 0 then
    redis.call('ZREM', turns, batch)
  elseif score then
    local c = math.floor(score / $PRIORITY_CLASS)
    redis.call('ZADD', turns, c * $PRIORITY_CLASS + redis.call('INCR', K.sequence()), batch)
  end
  charged[tenant] = (charged[tenant] or 0) + got
end

local drained = {}
local function fill(index, tenant)
  for _, batch in ipairs(redis.call('ZRANGE', index, 0, max)) do
    if #taken >= max or budget <= 0 then break end
    if not drained[batch] then
      drained[batch] = true
      drain(batch, tenant or tenant_of(batch))
    end
  end
end
drained[chosen] = true
drain(chosen, owner)
if #taken < max then fill(K.tenant_pending(owner, compat), owner) end
if #taken < max then fill(K.pending(compat), nil) end
if redis.call('EXISTS', K.pending(compat)) == 0 then
  redis.call('HDEL', since_key, compat)
end

-- Each tenant served pays for its jobs; the fair clock moves to the pass of the one chosen.
local chosen_pass = tonumber(redis.call('ZSCORE', tenants, owner)) or clock
if chosen_pass > clock then redis.call('SET', K.fair_clock(model), chosen_pass) end
for tenant, n in pairs(charged) do
  local pass = tonumber(redis.call('ZSCORE', tenants, tenant))
  if pass then
    pass = pass + n / weight(tenant)
    if redis.call('EXISTS', K.batch_turns(model, tenant)) == 1 then
      redis.call('ZADD', tenants, pass, tenant)
    else
      leave(tenant, pass)
    end
  end
end
idle()
local out = {compat, '', skipped}
for i = 1, #taken do out[#out + 1] = taken[i] end
return out
