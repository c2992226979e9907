-- Hides the usage chunk nexus-extproc asked for on an OpenAI stream's behalf (`stream_options.include_usage`
-- added to a request that did not set it): the client gets exactly the stream it asked for, while
-- sse_to_metadata, which sees the response before this filter, has already read the usage for settlement.
-- Runs only on the route of such streams (envoy/nexus.yaml), in LuaJIT, with no round trip to the server.
--
-- Only whole events go out: a partial event waits for the rest of it in the next chunk. A stream that ends in
-- the middle of an event loses that fragment, which an SSE client discards anyway (an event is dispatched only
-- at its blank line). An event is usage-only when its `choices` is empty and its `usage` is an object.

local find, sub = string.find, string.sub
local MAX_CARRY = 1048576 -- sse_to_metadata's max_event_size in envoy/nexus.yaml

local function usage_only(event)
  return find(event, '"choices"%s*:%s*%[%s*%]') ~= nil and find(event, '"usage"%s*:%s*{') ~= nil
end

-- The end of the first event at or after `pos` (its blank line), or nil.
local function event_end(data, pos)
  local _, lf = find(data, "\n\n", pos, true)
  local _, crlf = find(data, "\r\n\r\n", pos, true)
  if lf and crlf then
    return lf < crlf and lf or crlf
  end
  return lf or crlf
end

function envoy_on_response(handle)
  -- Only an event stream has events to hide. Anything else on this route (the filter's own refusal in the
  -- provider's JSON error shape, an upstream's error page) goes out untouched: held as a partial event, it
  -- would never be sent.
  local ctype = handle:headers():get("content-type") or ""
  if find(ctype, "text/event-stream", 1, true) == nil then
    return
  end
  local carry = ""
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    local data = carry .. (n > 0 and chunk:getBytes(0, n) or "")
    local pos, out, dropped = 1, {}, false
    while true do
      local e = event_end(data, pos)
      if e == nil then
        break
      end
      local event = sub(data, pos, e)
      if usage_only(event) then
        dropped = true
      else
        out[#out + 1] = event
      end
      pos = e + 1
    end
    carry = sub(data, pos)
    if #carry > MAX_CARRY then -- not SSE as we know it: let it through rather than hold it
      out[#out + 1] = carry
      carry = ""
    end
    if dropped or carry ~= "" or #data ~= n then
      chunk:setBytes(table.concat(out))
    end
  end
end
