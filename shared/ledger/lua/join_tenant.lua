-- A tenant with new pending work for `model` joins that model's tenant turns
-- (`shared.ledger.pending`) at the pass it had when it left, or at the fair clock (the pass of
-- the tenant served last) when that is later: time without work is never banked as credit.
-- Shared by every script that adds pending work (COMMIT_JOBS, TRANSITION, RETRY_JOBS, TAKE_CHUNK).
local function join_tenant(model, tenant)
  local turns = K.tenant_turns(model)
  if redis.call('ZSCORE', turns, tenant) then return end
  local clock = tonumber(redis.call('GET', K.fair_clock(model))) or 0
  local kept = tonumber(redis.call('HGET', K.tenant_pass(model), tenant)) or 0
  redis.call('ZADD', turns, math.max(clock, kept), tenant)
end
