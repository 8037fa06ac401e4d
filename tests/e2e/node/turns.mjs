// Two chained turns through the gateway with the Node SDK's ResponsesWS; prints one JSON line.
// Usage: node turns.mjs <base URL ending in /v1> <client key>
import OpenAI from 'openai';
import { ResponsesWS } from 'openai/resources/responses/ws';

const [baseURL, apiKey] = process.argv.slice(2);
const ws = new ResponsesWS(new OpenAI({ baseURL, apiKey }));
const turns = [];

function turn(body) {
  return new Promise((resolve, reject) => {
    const types = [];
    const onEvent = (event) => {
      types.push(event.type);
      if (event.type === 'response.completed' || event.type === 'error') {
        ws.off('event', onEvent);
        resolve({ types, last: event });
      }
    };
    ws.on('event', onEvent);
    ws.on('error', reject);
    ws.send({ type: 'response.create', model: 'gpt-4o-mini', ...body });
  });
}

const first = await turn({ input: 'hello from node', store: false });
turns.push(first);
const second = await turn({ input: 'and again', store: false, previous_response_id: first.last.response?.id });
turns.push(second);
ws.close();
console.log(JSON.stringify(turns.map(({ types, last }) => ({
  types, last: last.type, id: last.response?.id, previous: last.response?.previous_response_id ?? null,
}))));
