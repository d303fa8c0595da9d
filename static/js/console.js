// The operator console's live jobs list (templates/admin/provisioning/provisioningjob/_overview.html).
// A refresh would drop the rows an operator is choosing for an action, so a poll is skipped while
// any row is selected or an action is chosen; after a refresh brings new rows, Django's action
// checkboxes (admin/js/actions.js) are bound to them.
'use strict';
{
    function choosingRows() {
        if (document.querySelector('#result_list input.action-select:checked, #action-toggle:checked')) {
            return true;
        }
        const action = document.querySelector('#changelist-form select[name=action]');
        return Boolean(action && action.value);
    }

    document.addEventListener('htmx:beforeRequest', function(event) {
        if (event.detail.elt && event.detail.elt.id === 'job-overview' && choosingRows()) {
            event.preventDefault();  // skip this poll; the next one asks again
        }
    });

    let boundTable = null;
    document.addEventListener('DOMContentLoaded', function() {
        boundTable = document.getElementById('result_list');
    });
    document.addEventListener('htmx:afterSettle', function() {
        const table = document.getElementById('result_list');
        if (!table || table === boundTable || typeof window.Actions !== 'function') {
            return;
        }
        boundTable = table;
        const checkboxes = table.querySelectorAll('tr input.action-select');
        const counter = document.querySelector('.action-counter');
        if (counter) {
            counter.dataset.actionsIcnt = String(checkboxes.length);  // "n of <rows> selected"
        }
        if (checkboxes.length > 0) {
            window.Actions(checkboxes);
        }
    });
}
