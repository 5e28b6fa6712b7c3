-- Argo CD health check for keyward.dev ProvisioningKey and PolicyAgent.
-- Reads the kstatus conditions the operator writes (Ready, Reconciling, Stalled) and
-- status.observedGeneration. Written for Argo CD's Lua 5.1 interpreter (gopher-lua); tested on
-- statuses captured from a real API server (tests/plane/gitops.rs).
--   Degraded:    Stalled=True (a human must act: invalid spec, name taken, rotation stalled).
--   Progressing: the operator has not observed the current generation yet, Reconciling=True
--                (a new spec not acted on yet), or Ready is not True for another reason.
--   Healthy:     Ready=True for the current generation. A scheduled or requested rotation
--                keeps the object Healthy (Rotating=True is only named in the message), so
--                a rotation never holds up a sync wave.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local reason = c.reason or ""
  local message = c.message or ""
  if reason == "" then
    return message
  end
  return reason .. ": " .. message
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Keyward operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the Keyward operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  local rotating = condition("Rotating")
  if rotating ~= nil and rotating.status == "True" then
    hs.message = "Rotation in flight (" .. describe(rotating) .. "); " .. hs.message
  end
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Waiting for the Ready condition"
end
return hs
